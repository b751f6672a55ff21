// Memory bandwidth probe (see membw.h).
#include "membw.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

namespace jax_ddl {

double CopyBandwidth(int64_t bytes_per_thread, int threads, int iters) {
  threads = std::max(1, threads);
  iters = std::max(1, iters);
  std::vector<std::vector<char>> src(threads), dst(threads);
  for (int t = 0; t < threads; ++t) {
    src[t].assign(bytes_per_thread, 1);  // touched: no page faults inside the timing
    dst[t].assign(bytes_per_thread, 0);
  }
  std::vector<double> rates;
  for (int it = 0; it < iters; ++it) {
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        ready.fetch_add(1);
        while (!go.load()) std::this_thread::yield();
        std::memcpy(dst[t].data(), src[t].data(), bytes_per_thread);
      });
    }
    while (ready.load() < threads) std::this_thread::yield();
    const auto start = std::chrono::steady_clock::now();
    go.store(true);
    for (auto& th : pool) th.join();
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    rates.push_back(2.0 * static_cast<double>(bytes_per_thread) * threads / secs);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

}  // namespace jax_ddl
