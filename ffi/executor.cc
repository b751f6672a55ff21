// The growable worker pool behind every call (see executor.h).
#include "executor.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>

namespace jax_ddl {
namespace {

constexpr auto kIdleExit = std::chrono::seconds(60);
constexpr int64_t kKeepIdle = 4;

class Pool {
 public:
  void Submit(std::function<void()> task) {
    std::unique_lock<std::mutex> lock(mu_);
    tasks_.push_back(std::move(task));
    // Each idle worker takes one task when it wakes; spawn when there are not enough.
    if (idle_ >= static_cast<int64_t>(tasks_.size())) {
      cv_.notify_one();
      return;
    }
    ++threads_;
    lock.unlock();
    std::thread([this] { Work(); }).detach();
  }

  int64_t threads() {
    std::lock_guard<std::mutex> lock(mu_);
    return threads_;
  }

 private:
  void Work() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      while (tasks_.empty()) {
        ++idle_;
        const bool timed_out = cv_.wait_for(lock, kIdleExit) == std::cv_status::timeout;
        --idle_;
        if (timed_out && tasks_.empty() && threads_ > kKeepIdle) {
          --threads_;
          return;
        }
      }
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      task = nullptr;  // release what it captured before waiting again
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  int64_t idle_ = 0;
  int64_t threads_ = 0;
};

Pool& GetPool() {
  static Pool* pool = new Pool();  // never destroyed: workers may outlive static destructors
  return *pool;
}

}  // namespace

void RunOnWorker(std::function<void()> task) { GetPool().Submit(std::move(task)); }

int64_t WorkerThreads() { return GetPool().threads(); }

}  // namespace jax_ddl
