// The growable worker pool behind every call (see executor.h).
#include "executor.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

namespace jax_ddl {
namespace {

constexpr auto kIdleExit = std::chrono::seconds(60);
constexpr int64_t kKeepIdle = 4;

class Pool {
 public:
  bool Submit(std::function<void()> task) {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t id = next_id_++;
    tasks_.push_back(Task{id, std::move(task)});
    // Each idle worker takes one task when it wakes; spawn when there are not enough.
    if (idle_ >= static_cast<int64_t>(tasks_.size())) {
      cv_.notify_one();
      return true;
    }
    ++threads_;
    lock.unlock();
    try {
      std::thread([this] { Work(); }).detach();
      return true;
    } catch (const std::system_error&) {
      // Out of threads: take the task back unless a worker already has it.
      lock.lock();
      --threads_;
      for (auto it = tasks_.begin(); it != tasks_.end(); ++it) {
        if (it->id == id) {
          tasks_.erase(it);
          return false;
        }
      }
      return true;
    }
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
      std::function<void()> task = std::move(tasks_.front().run);
      tasks_.pop_front();
      lock.unlock();
      task();
      task = nullptr;  // release what it captured before waiting again
      lock.lock();
    }
  }

  struct Task {
    uint64_t id;
    std::function<void()> run;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> tasks_;
  uint64_t next_id_ = 0;
  int64_t idle_ = 0;
  int64_t threads_ = 0;
};

Pool& GetPool() {
  static Pool* pool = new Pool();  // never destroyed: workers may outlive static destructors
  return *pool;
}

}  // namespace

bool RunOnWorker(std::function<void()> task) { return GetPool().Submit(std::move(task)); }

int64_t WorkerThreads() { return GetPool().threads(); }

}  // namespace jax_ddl
