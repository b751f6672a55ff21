// The element work of the CUDA engine's stages, written once for host and device.
//
// A reduce-scatter stage of rank r reads the same span of every group peer's buffer (a
// table of pointers: peers' memory inside a process, jax_ddl's IPC staging between
// processes; only how the table is filled differs) and writes the span's reduction into
// its own staging buffer; the all-gather copies each owner's final span into the output.
// Both are ReduceSpan: one thread of a grid of `nthreads` handles every nthreads-th pack
// of the span. On the device a kernel calls it with its global thread index; the host
// tests (ffi/tests/test_cuda_stages.cc) call it for every thread index of the same
// geometry, so the index arithmetic, vector packing and reduction order are tested
// without a GPU.
//
// Reduction order is the plan's: acc = src[0], then acc op= src[1], ... src[k-1], in the
// accumulator type (float32 for 16-bit floats), rounded once when stored. The CPU engine
// reduces in the same order (kernels.h), so both give the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "element.h"

namespace jax_ddl {
namespace cuda {

// Most sources of one stage kernel: a group of the plan on one host (devices of a
// process, or processes of a host times their devices). Larger groups are refused when
// the plan is made, with a message.
constexpr int kMaxGroup = 16;
// Most segments of one gather: every rank of the host-local levels.
constexpr int kMaxLocalRanks = 64;

// Bytes one thread moves per vector access.
constexpr int64_t kPackBytes = 16;

// Elements per pack for source type S and destination type D (a pack is at most 16 bytes
// of either). kVector false: one element (for pointers that are not 16-byte aligned).
template <typename S, typename D, bool kVector>
JAX_DDL_HD constexpr int64_t PackElements() {
  if constexpr (!kVector) {
    return 1;
  } else {
    return kPackBytes / (sizeof(S) > sizeof(D) ? sizeof(S) : sizeof(D));
  }
}

template <typename E, int64_t N>
struct alignas(sizeof(E) * N) Pack {
  E v[N];
};

// One aligned vector access on the device; memcpy on the host (no aliasing questions).
template <typename E, int64_t N>
JAX_DDL_HD inline Pack<E, N> LoadPack(const E* base, int64_t p) {
#ifdef __CUDA_ARCH__
  return reinterpret_cast<const Pack<E, N>*>(base)[p];
#else
  Pack<E, N> out;
  std::memcpy(&out, base + p * N, sizeof(out));
  return out;
#endif
}
template <typename E, int64_t N>
JAX_DDL_HD inline void StorePack(E* base, int64_t p, const Pack<E, N>& in) {
#ifdef __CUDA_ARCH__
  reinterpret_cast<Pack<E, N>*>(base)[p] = in;
#else
  std::memcpy(base + p * N, &in, sizeof(in));
#endif
}

template <Op kOp, typename A, typename S, typename D>
JAX_DDL_HD inline void ReduceOne(const S* const* srcs, int k, D* dst, int64_t i) {
  A acc = Load<A>(srcs[0][i]);
  for (int q = 1; q < k; ++q) acc = Combine<kOp>(acc, Load<A>(srcs[q][i]));
  dst[i] = Store<D>(acc);
}

template <Op kOp, typename A, typename S, typename D, int64_t V>
JAX_DDL_HD inline void ReducePack(const S* const* srcs, int k, D* dst, int64_t p) {
  const Pack<S, V> first = LoadPack<S, V>(srcs[0], p);
  A acc[V];
  for (int64_t j = 0; j < V; ++j) acc[j] = Load<A>(first.v[j]);
  for (int q = 1; q < k; ++q) {
    const Pack<S, V> in = LoadPack<S, V>(srcs[q], p);
    for (int64_t j = 0; j < V; ++j) acc[j] = Combine<kOp>(acc[j], Load<A>(in.v[j]));
  }
  Pack<D, V> out;
  for (int64_t j = 0; j < V; ++j) out.v[j] = Store<D>(acc[j]);
  StorePack<D, V>(dst, p, out);
}

// dst[i] = reduce over q < k of srcs[q][i], for i in [begin, end), the share of thread
// `tid` of `nthreads`. Elements before the first pack boundary and after the last one go
// one by one; the rest in packs of V. With kVector, every pointer must be 16-byte aligned
// (CanVectorize). A pointer of dst may equal one of srcs (each element is read before it
// is written, by the same thread).
template <Op kOp, typename A, typename S, typename D, bool kVector>
JAX_DDL_HD inline void ReduceSpan(const S* const* srcs, int k, D* dst, int64_t begin, int64_t end,
                                  int64_t tid, int64_t nthreads) {
  constexpr int64_t V = PackElements<S, D, kVector>();
  if (begin >= end) return;
  int64_t head_end = (begin + V - 1) / V * V;
  if (head_end > end) head_end = end;
  int64_t body_end = end / V * V;
  if (body_end < head_end) body_end = head_end;
  for (int64_t i = begin + tid; i < head_end; i += nthreads) ReduceOne<kOp, A>(srcs, k, dst, i);
  for (int64_t p = head_end / V + tid; p < body_end / V; p += nthreads) {
    ReducePack<kOp, A, S, D, V>(srcs, k, dst, p);
  }
  for (int64_t i = body_end + tid; i < end; i += nthreads) ReduceOne<kOp, A>(srcs, k, dst, i);
}

// Whether every pointer is aligned for packs.
JAX_DDL_HD inline bool CanVectorize(const void* const* ptrs, int n) {
  for (int q = 0; q < n; ++q) {
    if (reinterpret_cast<uintptr_t>(ptrs[q]) % kPackBytes != 0) return false;
  }
  return true;
}

// Grid of one element-wise pass: `threads` per block, `blocks` blocks, so that a thread
// handles a few packs (more blocks than that only add scheduling). No work: 0 blocks,
// and no launch.
struct Geometry {
  int64_t blocks = 0;
  int64_t threads = 0;
  int64_t total() const { return blocks * threads; }
};

// `packs`: packs (or single elements) of the pass; `sm_count`: multiprocessors of the
// device; `per_sm`: blocks that fit on one at once (the launcher asks the occupancy API;
// at most 4). 512 threads a block, never more blocks than one wave or than there is work
// for: a streaming pass at full occupancy keeps the memory system busy.
inline Geometry StageGeometry(int64_t packs, int sm_count, int per_sm = 4) {
  Geometry g;
  if (packs <= 0) return g;
  g.threads = 512;
  const int64_t most = static_cast<int64_t>(per_sm > 0 ? per_sm : 1) *
                       static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  const int64_t need = (packs + g.threads - 1) / g.threads;
  g.blocks = need < most ? need : most;
  return g;
}

// The geometry of a pass over [begin, end) in packs of `v` elements: enough threads for
// every pack plus the unaligned head and tail.
inline Geometry PassGeometry(int64_t begin, int64_t end, int64_t v, int sm_count, int per_sm = 4) {
  if (end <= begin) return Geometry{};
  return StageGeometry((end - begin + v - 1) / v + 1, sm_count, per_sm);
}

}  // namespace cuda
}  // namespace jax_ddl
