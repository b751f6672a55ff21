// Process-level transport over MPI for the allreduce across processes. The MPI library is
// bound at run time: after mpi4py has loaded it, Attach finds it with dlopen(RTLD_NOLOAD)
// and its functions with dlsym, so _ddl links no MPI and loads where there is none.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rendezvous.h"
#include "topology.h"

namespace jax_ddl {

// Reduces `n_src` arrays of `n` accumulator elements into `dst` in the order given.
using ReduceFn = void (*)(int op, const char* const* srcs, int64_t n_src, char* dst, int64_t n);

// What processes must agree on for one cross-process exchange; checked on receipt.
struct ProcessHeader {
  int64_t call_id = 0;
  int64_t count = 0;  // elements of the whole call (all buffers)
  int64_t dtype = 0;
  int64_t op = 0;
  int64_t num_buffers = 0;
  int64_t layout_hash = 0;  // of the per-buffer element counts: where messages split
  bool operator==(const ProcessHeader& o) const {
    return call_id == o.call_id && count == o.count && dtype == o.dtype && op == o.op &&
           num_buffers == o.num_buffers && layout_hash == o.layout_hash;
  }
};

// "call 3 (4096 elements of float32, sum)", for messages.
using DescribeFn = std::string (*)(const ProcessHeader&);

struct ProcessLayout {
  int64_t process = 0;    // this process's MPI rank
  int64_t processes = 1;  // MPI ranks
  int64_t slots = 0;      // local devices; one communicator each
};

// True once Attach succeeded: reductions may then span processes.
bool MpiAttached();
const ProcessLayout& MpiLayout();

// Binds the MPI library already loaded in this process and the per-slot communicators
// (MPI handles, one per local device slot, each spanning all processes). Returns false
// with *error when there is no MPI, it is not MPICH-ABI, or it lacks MPI_THREAD_MULTIPLE.
bool MpiAttach(const std::vector<int64_t>& comm_handles, int64_t process, int64_t processes,
               std::string* error);

// Whether this build has the transport (MPI headers were found at build time).
bool MpiCompiledIn();

// Exchanges `header` with the same slot of each of `processes` (the list must be
// symmetric: q lists this process when it is listed here) and compares. Fails naming the
// processes that never answered by `deadline`, or describing both sides of a mismatch.
bool MpiHandshake(int64_t slot, const std::vector<int64_t>& processes,
                  const ProcessHeader& header, DescribeFn describe, Clock::time_point deadline,
                  Failure* failure);

// Point-to-point streams between device threads of different processes, for plans whose
// groups span processes. A message to (process p, slot l) travels on slot l's
// communicator tagged with the sending slot, so each ordered pair of device threads has
// its own stream, and messages match in the order they were posted. Posted requests are
// kept per calling thread until MpiWait, which completes them all (or fails by
// `deadline`, naming the processes whose messages never came).
void MpiPostSend(int64_t my_slot, int64_t process, int64_t slot, const char* data, int64_t bytes);
void MpiPostRecv(int64_t my_slot, int64_t process, int64_t slot, char* data, int64_t bytes);
bool MpiWait(Clock::time_point deadline, const char* stage, Failure* failure);

// Allreduce across processes, in place on `data` (n elements of `elem` bytes), on slot
// `slot`'s communicator: reduce-scatter over `plan`'s dimensions (ranks = processes), then
// all-gather back; each element is reduced in plan order, so every process ends with the
// same bits. `scratch` receives peers' data (grown as needed, kept by the caller).
// Fails when `deadline` passes (naming the processes whose data never came) or when a
// peer's header differs from `header`.
bool MpiAllreduce(int64_t slot, char* data, int64_t n, int64_t elem, int op, ReduceFn reduce,
                  const Plan& plan, const ProcessHeader& header, DescribeFn describe,
                  Clock::time_point deadline, std::vector<char>* scratch, Failure* failure);

}  // namespace jax_ddl
