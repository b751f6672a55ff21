// The machine's memory bandwidth, measured with the same kind of traffic the allreduce
// makes (large copies on every core at once), so benchmarks can report a physical bound.
#pragma once

#include <cstdint>

namespace jax_ddl {

// Median over `iters` rounds of (bytes read + bytes written) per second while `threads`
// threads each copy `bytes_per_thread` between their own pre-touched buffers.
double CopyBandwidth(int64_t bytes_per_thread, int threads, int iters);

// Median over `iters` rounds of (bytes read + bytes written) per second while `threads`
// threads each reduce (sum) `sources` pre-touched buffers of `bytes_per_thread` into
// `destinations` of them (every one gets the result, as the last stage writes a slice into
// every rank's output) with the engine's kernel for `dtype` ("float32", "bfloat16",
// "float16", "float64", "int32", "int64"; 16-bit types accumulate in float32 as the engine
// does). Returns a negative value for an unknown dtype.
double ReduceBandwidth(const char* dtype, int64_t bytes_per_thread, int sources, int threads,
                       int iters, int destinations = 1);

}  // namespace jax_ddl
