// The CUDA engine's kernels: a stage's reduction pass, the all-gather, and the device-side
// barrier between them. The element work is cuda/stage.h's, shared with the host tests.
#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace jax_ddl {
namespace cuda {
namespace {

template <Op kOp, typename A, typename S, typename D, bool kVector>
__global__ void __launch_bounds__(512) PassKernel(PassArgs args) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const S* srcs[kMaxGroup];
  for (int q = 0; q < args.k; ++q) srcs[q] = static_cast<const S*>(args.srcs[q]);
  ReduceSpan<kOp, A, S, D, kVector>(srcs, args.k, static_cast<D*>(args.dst), args.begin, args.end,
                                    tid, nthreads);
}

template <typename A, typename D, bool kVector>
__global__ void __launch_bounds__(512) GatherKernel(GatherArgs args) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int j = 0; j < args.n; ++j) {
    const A* src = static_cast<const A*>(args.srcs[j]);
    ReduceSpan<Op::kSum, A, A, D, kVector>(&src, 1, static_cast<D*>(args.dst), args.begin[j],
                                           args.end[j], tid, nthreads);
  }
}

__device__ inline void StoreRelease(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ inline uint64_t LoadAcquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ inline uint64_t NowNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Two warps: thread j signals member j and waits for member j's signal. Every wait is bounded:
// past the deadline it records the member as missing and returns, leaving the device
// usable (the host reports the failure and fails the site's later calls).
__global__ void BarrierKernel(BarrierArgs a) {
  volatile BarrierError* err = a.error;
  if (err->failed) return;
  const int j = threadIdx.x;
  const bool peer = j < a.k && a.slot[j] != a.my_slot;
  __threadfence_system();  // this stream's earlier writes, before the signal
  if (peer) StoreRelease(a.peer_flags[j] + a.my_slot, a.epoch);
  if (peer) {
    const uint64_t start = NowNs();
    for (uint32_t spin = 0; LoadAcquire(a.my_flags + a.slot[j]) < a.epoch; ++spin) {
      if ((spin & 1023) == 1023) {
        if (err->failed) break;  // another member timed out: stop waiting too
        if (a.timeout_ns > 0 && NowNs() - start > static_cast<uint64_t>(a.timeout_ns)) {
          err->missing[j] = 1;
          err->stage = a.stage;
          err->epoch = a.epoch;
          __threadfence_system();
          err->failed = 1;
          break;
        }
      }
      __nanosleep(100);
    }
  }
  __threadfence_system();
}

// Blocks of 512 threads of `kernel` that fit on one multiprocessor at once (registers,
// threads), at most 4, so a pass's grid runs in one wave.
template <typename Kernel>
int BlocksPerSm(Kernel kernel) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, 512, 0) != cudaSuccess) n = 1;
  return n < 1 ? 1 : (n > 4 ? 4 : n);
}

template <Op kOp, typename A, typename S, typename D>
int Pass(const PassArgs& a, cudaStream_t stream, int sm_count) {
  if (a.end <= a.begin) return 0;
  const void* ptrs[kMaxGroup + 1];
  for (int q = 0; q < a.k; ++q) ptrs[q] = a.srcs[q];
  ptrs[a.k] = a.dst;
  const bool vec = CanVectorize(ptrs, a.k + 1);
  (void)cudaGetLastError();  // so the result below is this launch's
  static const int per_sm[2] = {BlocksPerSm(PassKernel<kOp, A, S, D, false>),
                                BlocksPerSm(PassKernel<kOp, A, S, D, true>)};
  const Geometry g =
      PassGeometry(a.begin, a.end, vec ? PackElements<S, D, true>() : 1, sm_count, per_sm[vec]);
  if (vec) {
    PassKernel<kOp, A, S, D, true><<<g.blocks, g.threads, 0, stream>>>(a);
  } else {
    PassKernel<kOp, A, S, D, false><<<g.blocks, g.threads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

template <Op kOp, typename T>
int PassOf(PassKind kind, const PassArgs& a, cudaStream_t stream, int sm_count) {
  using A = typename AccumOf<T>::type;
  if (kind == PassKind::kFirst) return Pass<kOp, A, T, A>(a, stream, sm_count);
  if (kind == PassKind::kMiddle) return Pass<kOp, A, A, A>(a, stream, sm_count);
  return static_cast<int>(cudaErrorInvalidValue);  // the gather has its own launcher
}

template <typename T>
int PassOp(Op op, PassKind kind, const PassArgs& a, cudaStream_t stream, int sm_count) {
  switch (op) {
    case Op::kSum:
      return PassOf<Op::kSum, T>(kind, a, stream, sm_count);
    case Op::kMax:
      return PassOf<Op::kMax, T>(kind, a, stream, sm_count);
    case Op::kMin:
      return PassOf<Op::kMin, T>(kind, a, stream, sm_count);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename T>
int Gather(const GatherArgs& a, cudaStream_t stream, int sm_count) {
  using A = typename AccumOf<T>::type;
  const void* ptrs[kMaxLocalRanks + 1];
  int64_t longest = 0;
  for (int j = 0; j < a.n; ++j) {
    ptrs[j] = a.srcs[j];
    if (a.end[j] - a.begin[j] > longest) longest = a.end[j] - a.begin[j];
  }
  if (longest == 0) return 0;
  ptrs[a.n] = a.dst;
  const bool vec = CanVectorize(ptrs, a.n + 1);
  (void)cudaGetLastError();
  static const int per_sm[2] = {BlocksPerSm(GatherKernel<A, T, false>),
                                BlocksPerSm(GatherKernel<A, T, true>)};
  const Geometry g =
      PassGeometry(0, longest, vec ? PackElements<A, T, true>() : 1, sm_count, per_sm[vec]);
  if (vec) {
    GatherKernel<A, T, true><<<g.blocks, g.threads, 0, stream>>>(a);
  } else {
    GatherKernel<A, T, false><<<g.blocks, g.threads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename Kernel>
int Load(Kernel kernel) {
  cudaFuncAttributes attributes;
  return static_cast<int>(cudaFuncGetAttributes(&attributes, kernel));
}

template <Op kOp, typename T>
int LoadOp() {
  using A = typename AccumOf<T>::type;
  int e = 0;
  for (int r : {Load(PassKernel<kOp, A, T, A, true>), Load(PassKernel<kOp, A, T, A, false>),
                Load(PassKernel<kOp, A, A, A, true>), Load(PassKernel<kOp, A, A, A, false>)}) {
    if (e == 0) e = r;
  }
  return e;
}

template <typename T>
int LoadType() {
  using A = typename AccumOf<T>::type;
  int e = 0;
  for (int r : {LoadOp<Op::kSum, T>(), LoadOp<Op::kMax, T>(), LoadOp<Op::kMin, T>(),
                Load(GatherKernel<A, T, true>), Load(GatherKernel<A, T, false>)}) {
    if (e == 0) e = r;
  }
  return e;
}

}  // namespace

int PreloadKernels() {
  int e = 0;
  for (int r : {LoadType<float>(), LoadType<double>(), LoadType<bf16_t>(), LoadType<f16_t>(),
                LoadType<int32_t>(), LoadType<int64_t>(), Load(BarrierKernel)}) {
    if (e == 0) e = r;
  }
  return e;
}

int LaunchPass(Elem elem, Op op, PassKind kind, const PassArgs& args, void* stream, int sm_count) {
  if (args.k < 1 || args.k > kMaxGroup) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (elem) {
    case Elem::kF32:
      return PassOp<float>(op, kind, args, s, sm_count);
    case Elem::kF64:
      return PassOp<double>(op, kind, args, s, sm_count);
    case Elem::kBF16:
      return PassOp<bf16_t>(op, kind, args, s, sm_count);
    case Elem::kF16:
      return PassOp<f16_t>(op, kind, args, s, sm_count);
    case Elem::kI32:
      return PassOp<int32_t>(op, kind, args, s, sm_count);
    case Elem::kI64:
      return PassOp<int64_t>(op, kind, args, s, sm_count);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int LaunchGather(Elem elem, const GatherArgs& args, void* stream, int sm_count) {
  if (args.n < 0 || args.n > kMaxLocalRanks) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (elem) {
    case Elem::kF32:
      return Gather<float>(args, s, sm_count);
    case Elem::kF64:
      return Gather<double>(args, s, sm_count);
    case Elem::kBF16:
      return Gather<bf16_t>(args, s, sm_count);
    case Elem::kF16:
      return Gather<f16_t>(args, s, sm_count);
    case Elem::kI32:
      return Gather<int32_t>(args, s, sm_count);
    case Elem::kI64:
      return Gather<int64_t>(args, s, sm_count);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int LaunchBarrier(const BarrierArgs& args, void* stream) {
  if (args.k < 1 || args.k > kMaxLocalRanks || args.error == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (args.k == 1) return 0;
  (void)cudaGetLastError();
  BarrierKernel<<<1, kMaxLocalRanks, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace jax_ddl
