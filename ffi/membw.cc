// Memory bandwidth probe (see membw.h).
#include "membw.h"

#include "element.h"
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace jax_ddl {

namespace {

// Runs body(t) on `threads` threads started together; returns the seconds all took.
template <typename Fn>
double Timed(int threads, Fn&& body) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      body(t);
    });
  }
  while (ready.load() < threads) std::this_thread::yield();
  const auto start = std::chrono::steady_clock::now();
  go.store(true);
  for (auto& th : pool) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

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
    const double secs = Timed(threads, [&](int t) {
      std::memcpy(dst[t].data(), src[t].data(), bytes_per_thread);
    });
    rates.push_back(2.0 * static_cast<double>(bytes_per_thread) * threads / secs);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

namespace {

template <typename T>
double ReduceRate(int64_t bytes_per_thread, int sources, int destinations, int threads,
                  int iters) {
  using A = typename AccumOf<T>::type;
  const int64_t n = std::max<int64_t>(1, bytes_per_thread / static_cast<int64_t>(sizeof(T)));
  const int per = sources + destinations;
  std::vector<std::vector<T>> bufs(static_cast<size_t>(threads) * per);
  for (auto& b : bufs) b.assign(n, T{});  // touched: no page faults inside the timing
  std::vector<double> rates;
  for (int it = 0; it < iters; ++it) {
    const double secs = Timed(threads, [&](int t) {
      std::vector<const char*> srcs;
      std::vector<char*> dsts;
      for (int q = 0; q < sources; ++q) {
        srcs.push_back(reinterpret_cast<const char*>(bufs[t * per + q].data()));
      }
      for (int q = 0; q < destinations; ++q) {
        dsts.push_back(reinterpret_cast<char*>(bufs[t * per + sources + q].data()));
      }
      ReduceKernel<Op::kSum, A, T, T>(srcs.data(), sources, dsts.data(), destinations, n);
    });
    const double bytes = static_cast<double>(n) * sizeof(T) * per * threads;
    rates.push_back(bytes / secs);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

}  // namespace

double ReduceBandwidth(const char* dtype, int64_t bytes_per_thread, int sources, int threads,
                       int iters, int destinations) {
  threads = std::max(1, threads);
  iters = std::max(1, iters);
  sources = std::max(1, sources);
  destinations = std::max(1, destinations);
  const std::string d(dtype);
  const int64_t b = bytes_per_thread;
  if (d == "float32") return ReduceRate<float>(b, sources, destinations, threads, iters);
  if (d == "float64") return ReduceRate<double>(b, sources, destinations, threads, iters);
  if (d == "bfloat16") return ReduceRate<bf16_t>(b, sources, destinations, threads, iters);
  if (d == "float16") return ReduceRate<f16_t>(b, sources, destinations, threads, iters);
  if (d == "int32") return ReduceRate<int32_t>(b, sources, destinations, threads, iters);
  if (d == "int64") return ReduceRate<int64_t>(b, sources, destinations, threads, iters);
  return -1.0;
}

}  // namespace jax_ddl
