// The machine's memory bandwidth, measured with the same kind of traffic the allreduce
// makes (large copies on every core at once), so benchmarks can report a physical bound.
#pragma once

#include <cstdint>

namespace jax_ddl {

// Median over `iters` rounds of (bytes read + bytes written) per second while `threads`
// threads each copy `bytes_per_thread` between their own pre-touched buffers.
double CopyBandwidth(int64_t bytes_per_thread, int threads, int iters);

}  // namespace jax_ddl
