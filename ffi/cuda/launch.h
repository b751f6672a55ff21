// Host interface of the CUDA engine's kernels (ffi/cuda/kernels.cu): the passes of a plan
// stage and the device-side barrier between them. No CUDA headers here, so the planning
// code and its tests compile with the host compiler alone.
#pragma once

#include <cstdint>

#include "cuda/stage.h"

namespace jax_ddl {
namespace cuda {

enum class Elem : int32_t { kF32, kF64, kBF16, kF16, kI32, kI64 };

// A stage's reduction reads element type T (the input, first stage) or the accumulator
// (staging, later stages) and writes the accumulator; the gather writes T back.
enum class PassKind : int32_t { kFirst, kMiddle, kGather };

// One reduce-scatter pass of one rank: dst[i] = srcs[0][i] op ... op srcs[k-1][i] for i in
// [begin, end) (element indices from each pointer's start).
struct PassArgs {
  const void* srcs[kMaxGroup];
  int32_t k = 0;
  void* dst = nullptr;
  int64_t begin = 0;
  int64_t end = 0;
};

// The all-gather of one rank: dst[i] = srcs[j][i] (accumulator to T) for i in
// [begin[j], end[j]), every owner j.
struct GatherArgs {
  const void* srcs[kMaxLocalRanks];
  int64_t begin[kMaxLocalRanks];
  int64_t end[kMaxLocalRanks];
  int32_t n = 0;
  void* dst = nullptr;
};

// Where a barrier that timed out says so: pinned host memory mapped into the device, read
// by the host before the next call of the site. `missing[j]` is set when group member j
// never signalled. Once `failed` is set, later barriers of the site return at once.
struct BarrierError {
  uint32_t failed;
  uint32_t stage;  // the barrier's index in its call (cuda/schedule.h)
  uint64_t epoch;
  uint8_t missing[kMaxLocalRanks];
};

// A barrier of one rank with its group (a stage's, or every host-local rank's): it stores `epoch`
// into its slot of every member's flag array (`peer_flags[j][my_slot]`, release, system scope),
// then waits until every member's slot of its own flags (`my_flags[slot[j]]`) reaches `epoch`
// (acquire), for at most `timeout_ns` (0: no limit). Epochs grow with every barrier of the site, so
// a flag never has to be reset.
struct BarrierArgs {
  uint64_t* peer_flags[kMaxLocalRanks];
  int32_t slot[kMaxLocalRanks];
  int32_t k = 0;
  int32_t my_slot = 0;
  uint64_t* my_flags = nullptr;
  uint64_t epoch = 0;
  int64_t timeout_ns = 0;
  uint32_t stage = 0;
  BarrierError* error = nullptr;  // device view of the pinned record
};

// Each enqueues one kernel on `stream` (a cudaStream_t) and returns the launch's
// cudaError_t as an int (0: success). Nothing to do: no launch, 0.
int LaunchPass(Elem elem, Op op, PassKind kind, const PassArgs& args, void* stream, int sm_count);
int LaunchGather(Elem elem, const GatherArgs& args, void* stream, int sm_count);
int LaunchBarrier(const BarrierArgs& args, void* stream);

// Loads every kernel on the current device now. A kernel loaded lazily at its first launch
// may wait for the device to go idle, which cannot happen while a barrier spins there for
// a peer. Returns the first cudaError_t as an int (0: success).
int PreloadKernels();

}  // namespace cuda
}  // namespace jax_ddl
