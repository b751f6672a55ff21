// The CUDA engine's kernels on a real GPU, with P ranks as buffers on one device, each rank
// on its own stream (as each device's stream would be), enqueueing the engine's schedule
// (cuda/schedule.h: reduce-scatter stages and the all-gather between device-side
// barriers), checked bit for bit against the host's plan-order reduction for every dtype,
// op, grid and several sizes; a barrier whose peer never arrives must time out, record the
// missing member and leave the device usable. Then the bandwidth of one stage's reduction
// against cudaMemcpy device-to-device in the same run (bytes each pass must read and write).
//
// Exit codes: 0 passed, 1 failed, 77 no CUDA device (ctest counts it as skipped).
// Usage: cuda_check [--bench] [--bench-mib N]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/launch.h"
#include "cuda/schedule.h"
#include "oracle.h"
#include "topology.h"

using namespace jax_ddl;
using namespace jax_ddl::cuda;

#define CUDA_OK(expr)                                                                             \
  do {                                                                                            \
    cudaError_t e_ = (expr);                                                                      \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

template <typename T>
struct ElemOf;
template <>
struct ElemOf<float> {
  static constexpr Elem value = Elem::kF32;
};
template <>
struct ElemOf<double> {
  static constexpr Elem value = Elem::kF64;
};
template <>
struct ElemOf<bf16_t> {
  static constexpr Elem value = Elem::kBF16;
};
template <>
struct ElemOf<f16_t> {
  static constexpr Elem value = Elem::kF16;
};
template <>
struct ElemOf<int32_t> {
  static constexpr Elem value = Elem::kI32;
};
template <>
struct ElemOf<int64_t> {
  static constexpr Elem value = Elem::kI64;
};

using testing::SameBits;
using testing::Value;

// P ranks on one device: inputs and outputs of each call, staging (accumulator type),
// flags, streams. Buffers start `offset` bytes past an allocation (cudaMalloc aligns to
// 256 bytes; a non-multiple of 16 takes the kernels' scalar path).
struct Ranks {
  int64_t n = 0;
  std::vector<void*> in, staging, out;  // in/out: index call * n + rank
  std::vector<void*> allocations;
  std::vector<uint64_t*> flags;
  std::vector<cudaStream_t> streams;
  BarrierError* error_host = nullptr;
  BarrierError* error_dev = nullptr;
  uint64_t epoch = 0;

  void* Alloc(int64_t bytes, int64_t offset) {
    void* p;
    CUDA_OK(cudaMalloc(&p, bytes + offset + 16));
    allocations.push_back(p);
    return static_cast<char*>(p) + offset;
  }

  Ranks(int64_t ranks, int64_t bytes_in, int64_t bytes_acc, int calls = 1, int64_t offset_in = 0,
        int64_t offset_acc = 0)
      : n(ranks) {
    flags.resize(n), streams.resize(n);
    for (int64_t j = 0; j < calls * n; ++j) {
      in.push_back(Alloc(bytes_in, offset_in));
      out.push_back(Alloc(bytes_in, offset_in));
    }
    for (int64_t r = 0; r < n; ++r) {
      staging.push_back(Alloc(bytes_acc, offset_acc));
      flags[r] = static_cast<uint64_t*>(Alloc(kMaxLocalRanks * sizeof(uint64_t), 0));
      CUDA_OK(cudaMemset(flags[r], 0, kMaxLocalRanks * sizeof(uint64_t)));
      CUDA_OK(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking));
    }
    CUDA_OK(cudaHostAlloc(&error_host, sizeof(BarrierError), cudaHostAllocMapped));
    std::memset(error_host, 0, sizeof(BarrierError));
    CUDA_OK(cudaHostGetDevicePointer(&error_dev, error_host, 0));
    // The flag resets (legacy stream) land before any rank's stream uses the flags.
    CUDA_OK(cudaDeviceSynchronize());
  }
  ~Ranks() {
    cudaDeviceSynchronize();
    for (void* p : allocations) cudaFree(p);
    for (cudaStream_t s : streams) cudaStreamDestroy(s);
    cudaFreeHost(error_host);
  }

  // Rank r's barrier with `members` (plan order), all at `epoch`.
  void Barrier(int64_t r, const std::vector<int64_t>& members, uint64_t at, int64_t timeout_ns,
               uint32_t stage) {
    BarrierArgs a;
    a.k = static_cast<int32_t>(members.size());
    for (int j = 0; j < a.k; ++j) {
      a.peer_flags[j] = flags[members[j]];
      a.slot[j] = static_cast<int32_t>(members[j]);
    }
    a.my_slot = static_cast<int32_t>(r);
    a.my_flags = flags[r];
    a.epoch = at;
    a.timeout_ns = timeout_ns;
    a.stage = stage;
    a.error = error_dev;
    CHECK(LaunchBarrier(a, streams[r]) == 0, "barrier launch");
  }
};

template <Op kOp, typename T>
void RunCase(const std::vector<int64_t>& dims, int64_t count, int offset, std::mt19937& rng,
             int sms) {
  using A = typename AccumOf<T>::type;
  int64_t P = 1;
  for (int64_t d : dims) P *= d;
  Plan plan;
  std::string err;
  if (!Plan::Make(dims, P, &plan, &err)) std::abort();
  const int calls = 2;
  const std::string what = FormatTopology(dims) + ", count " + std::to_string(count) + ", offset " +
                           std::to_string(offset) + ", " + std::to_string(sizeof(T)) +
                           "-byte type, op " + std::to_string(static_cast<int>(kOp));
  Ranks R(P, count * sizeof(T), count * sizeof(A), calls, offset * sizeof(T), offset * sizeof(A));
  std::vector<std::vector<T>> host(calls * P, std::vector<T>(count));
  for (int64_t j = 0; j < calls * P; ++j) {
    for (auto& v : host[j]) v = Value<T>(rng);
    CUDA_OK(cudaMemcpy(R.in[j], host[j].data(), count * sizeof(T), cudaMemcpyHostToDevice));
  }
  CUDA_OK(cudaDeviceSynchronize());
  const int64_t timeout_ns = int64_t{5} * 1000 * 1000 * 1000;
  // Two calls in a row at the same site with different inputs and no host sync between
  // them (the flags carry over, epochs grow, the last barrier guards the staging). Each
  // rank enqueues the engine's schedule (cuda/schedule.h) on its own stream, step by step
  // across the ranks, as concurrent device threads would.
  const int64_t per_call = BarriersPerCall(plan);
  std::vector<std::vector<Step>> steps(P);
  for (int64_t r = 0; r < P; ++r) steps[r] = RankSchedule(plan, r, count);
  for (int c = 0; c < calls; ++c) {
    for (size_t i = 0; i < steps[0].size(); ++i) {
      for (int64_t r = 0; r < P; ++r) {
        const Step& st = steps[r][i];
        if (st.kind == Step::Kind::kBarrier) {
          R.Barrier(r, st.ranks, R.epoch + st.index + 1, timeout_ns,
                    static_cast<uint32_t>(st.index));
        } else if (st.kind == Step::Kind::kPass) {
          PassArgs a;
          a.k = static_cast<int32_t>(st.ranks.size());
          for (int g = 0; g < a.k; ++g) {
            a.srcs[g] =
                st.pass == PassKind::kFirst ? R.in[c * P + st.ranks[g]] : R.staging[st.ranks[g]];
          }
          a.dst = R.staging[r];
          a.begin = st.range.begin, a.end = st.range.end;
          CHECK(LaunchPass(ElemOf<T>::value, kOp, st.pass, a, R.streams[r], sms) == 0,
                "%s: pass launch", what.c_str());
        } else {
          GatherArgs g;
          g.n = static_cast<int32_t>(P);
          for (int64_t o = 0; o < P; ++o) {
            g.srcs[o] = R.staging[o];
            g.begin[o] = st.spans[o].begin, g.end[o] = st.spans[o].end;
          }
          g.dst = R.out[c * P + r];
          CHECK(LaunchGather(ElemOf<T>::value, g, R.streams[r], sms) == 0, "%s: gather launch",
                what.c_str());
        }
      }
    }
    R.epoch += per_call;
  }
  CUDA_OK(cudaDeviceSynchronize());
  CHECK(!R.error_host->failed, "%s: a barrier timed out", what.c_str());
  for (int c = 0; c < calls; ++c) {
    std::vector<const T*> inputs;
    for (int64_t r = 0; r < P; ++r) inputs.push_back(host[c * P + r].data());
    const std::vector<T> want = testing::PlanOrderReduce<kOp, T>(plan, inputs, count);
    std::vector<T> got(count);
    for (int64_t r = 0; r < P; ++r) {
      CUDA_OK(cudaMemcpy(got.data(), R.out[c * P + r], count * sizeof(T), cudaMemcpyDeviceToHost));
      int64_t wrong = 0, first = -1;
      for (int64_t i = 0; i < count; ++i) {
        if (!SameBits(want[i], got[i])) {
          if (first < 0) first = i;
          ++wrong;
        }
      }
      CHECK(wrong == 0, "%s: call %d rank %lld: %lld wrong elements, first at %lld", what.c_str(),
            c, (long long)r, (long long)wrong, (long long)first);
    }
  }
}

template <typename T>
void RunType(std::mt19937& rng, int sms) {
  const std::vector<std::vector<int64_t>> grids = {{1}, {2}, {3}, {4, 2}, {2, 2, 2}, {8}};
  for (const auto& dims : grids) {
    for (int64_t count :
         {int64_t{0}, int64_t{1}, int64_t{7}, int64_t{1021}, (int64_t{1} << 20) + 3}) {
      RunCase<Op::kSum, T>(dims, count, 0, rng, sms);
      if (count == 1021) {
        RunCase<Op::kSum, T>(dims, count, 1, rng, sms);  // unaligned: the scalar kernels
        RunCase<Op::kMax, T>(dims, count, 0, rng, sms);
        RunCase<Op::kMin, T>(dims, count, 0, rng, sms);
      }
    }
  }
}

// A peer that never arrives: the barrier returns after its deadline, names the member and
// the device stays usable (a later copy and kernel work).
static void TestMissingPeer(int sms) {
  Ranks R(2, 4096, 4096);
  const int64_t timeout_ns = 200 * 1000 * 1000;
  R.Barrier(0, {0, 1}, 1, timeout_ns, 0);  // rank 1 never calls its barrier
  CUDA_OK(cudaStreamSynchronize(R.streams[0]));
  CHECK(R.error_host->failed == 1, "the barrier did not time out");
  CHECK(R.error_host->missing[1] == 1 && R.error_host->missing[0] == 0,
        "missing members recorded: %d %d", R.error_host->missing[0], R.error_host->missing[1]);
  CHECK(R.error_host->epoch == 1, "epoch recorded: %llu", (unsigned long long)R.error_host->epoch);
  PassArgs a;
  a.k = 1, a.srcs[0] = R.in[0], a.dst = R.out[0], a.begin = 0, a.end = 1024;
  CHECK(LaunchPass(Elem::kF32, Op::kSum, PassKind::kFirst, a, R.streams[0], sms) == 0,
        "device unusable after a timed-out barrier");
  CHECK(cudaStreamSynchronize(R.streams[0]) == cudaSuccess, "device unusable after a timeout");
}

// One stage's reduction (k = P sources, each rank its 1/P slice) over P ranks as buffers,
// ranks one after another on one stream, against cudaMemcpy device-to-device of one
// buffer: GB/s of the bytes each must read and write, median of `iters`.
static void Bench(int64_t mib, int sms) {
  const int64_t count = mib * (1 << 20) / 4;
  float copy_ms = 0;
  cudaEvent_t e0, e1;
  CUDA_OK(cudaEventCreate(&e0));
  CUDA_OK(cudaEventCreate(&e1));
  auto median = [](std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  {
    void *x, *y;
    CUDA_OK(cudaMalloc(&x, count * 4));
    CUDA_OK(cudaMalloc(&y, count * 4));
    std::vector<float> t;
    for (int i = 0; i < 21; ++i) {
      CUDA_OK(cudaEventRecord(e0));
      CUDA_OK(cudaMemcpyAsync(y, x, count * 4, cudaMemcpyDeviceToDevice));
      CUDA_OK(cudaEventRecord(e1));
      CUDA_OK(cudaEventSynchronize(e1));
      float ms;
      CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
      if (i > 0) t.push_back(ms);
    }
    copy_ms = median(t);
    cudaFree(x), cudaFree(y);
  }
  const double copy_gbs = 2.0 * count * 4 / (copy_ms * 1e6);
  std::printf("# device-to-device copy, %lld MiB: %.3f ms, %.1f GB/s (read + write)\n",
              (long long)mib, copy_ms, copy_gbs);
  std::printf("#  ranks  stage ms   GB/s  of copy\n");
  for (int64_t P : {2, 4, 8}) {
    Ranks R(P, count * 4, count * 4);
    Plan plan;
    std::string err;
    Plan::Make({P}, P, &plan, &err);
    std::vector<float> t;
    for (int i = 0; i < 21; ++i) {
      CUDA_OK(cudaEventRecord(e0));
      for (int64_t r = 0; r < P; ++r) {
        PassArgs a;
        a.k = static_cast<int32_t>(P);
        for (int64_t q = 0; q < P; ++q) a.srcs[q] = R.in[q];
        a.dst = R.staging[r];
        const Range mine = plan.Region(r, 1, count);
        a.begin = mine.begin, a.end = mine.end;
        CHECK(LaunchPass(Elem::kF32, Op::kSum, PassKind::kFirst, a, nullptr, sms) == 0, "launch");
      }
      CUDA_OK(cudaEventRecord(e1));
      CUDA_OK(cudaEventSynchronize(e1));
      float ms;
      CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
      if (i > 0) t.push_back(ms);
    }
    const float ms = median(t);
    // Every rank reads P slices of count / P and writes one: (P + 1) x count elements.
    const double gbs = (P + 1.0) * count * 4 / (ms * 1e6);
    std::printf("  %5lld  %8.3f  %6.1f  %5.1f %%\n", (long long)P, ms, gbs, 100 * gbs / copy_gbs);
  }
}

int main(int argc, char** argv) {
  // Before the first CUDA call: load every kernel now (a kernel loaded lazily at its first
  // launch may wait for the device, where a barrier spins), and give each rank's stream a
  // hardware queue of its own, so no barrier waits behind another rank's.
  setenv("CUDA_MODULE_LOADING", "EAGER", 1);
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 1);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  bool bench = false;
  int64_t mib = 256;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--bench")) bench = true;
    if (!std::strcmp(argv[i], "--bench-mib") && i + 1 < argc) mib = std::atoll(argv[++i]);
  }
  cudaDeviceProp prop;
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  std::printf("# device 0: %s, %d SMs, compute %d.%d\n", prop.name, sms, prop.major, prop.minor);
  std::mt19937 rng(11);
  RunType<float>(rng, sms);
  RunType<double>(rng, sms);
  RunType<int32_t>(rng, sms);
  RunType<int64_t>(rng, sms);
  RunType<bf16_t>(rng, sms);
  RunType<f16_t>(rng, sms);
  TestMissingPeer(sms);
  if (bench) {
    Bench(64, sms);
    if (mib != 64) Bench(mib, sms);
  }
  if (testing::Failures()) {
    std::fprintf(stderr, "%d check(s) failed\n", testing::Failures());
    return 1;
  }
  std::printf("cuda kernels on the device: all checks passed\n");
  return 0;
}
