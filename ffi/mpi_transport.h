// Process-level transport over MPI for the allreduce across processes. The MPI library is
// bound at run time: after mpi4py has loaded it, Attach finds it with dlopen(RTLD_NOLOAD)
// and its functions with dlsym, so _ddl links no MPI and loads where there is none.
//
// Every message of a call is one frame, a header and its payload, verified before its
// bytes are used: the handshake's header says which call (call site and how many times
// this process has run it) and what every process must agree on; a data frame's header
// names the call, the stage and the payload's size, which must match exactly. Late
// messages of a call that failed (a slow but alive peer) are recognised and discarded,
// never taken for the next call's. Frames live in jax_ddl's own buffers, never XLA's.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "rendezvous.h"
#include "topology.h"

namespace jax_ddl {

// A call site as every process names it.
struct CallLabel {
  uint64_t module_hash = 0;
  int64_t site = 0;
  int64_t copy = 0;
};

constexpr int kWireDims = 16;       // topology dimensions carried in a header
constexpr int kMaxMpiStages = 31;   // stages one call may run over MPI
constexpr int64_t kMaxSlots = 256;  // local devices per process (a tag field)

// The header of every cross-process frame. The handshake's carries everything the
// processes must agree on; a data message's names its call, stage and size.
struct WireHeader {
  uint32_t magic = 0;
  uint32_t kind = 0;  // message kind (see MpiCall): handshake, done or a stage
  uint64_t module_hash = 0;
  int64_t site = 0;
  int64_t copy = 0;
  int64_t seq = 0;            // how many times this process ran the call site before
  int64_t payload_bytes = 0;  // data messages: bytes that follow
  int64_t chunk = 0;          // data messages: the pipeline chunk the payload belongs to
  // Handshake only.
  int64_t count = 0;  // elements of the whole call (all buffers)
  int64_t num_buffers = 0;
  int64_t layout_hash = 0;  // of the per-buffer element counts
  int32_t dtype = 0;
  int32_t op = 0;
  int32_t mode = 0;   // how the plan maps onto processes (Mode)
  int32_t ndims = 0;  // topology dimensions (only the first kWireDims are carried)
  int64_t dims[kWireDims] = {};
  uint64_t dims_hash = 0;
  int64_t timeout_ms = 0;
  int64_t chunks = 0;  // pipeline chunks the call is cut into (JAX_DDL_CHUNK_BYTES)
  char module_name[64] = {};
};

// Bytes before a frame's payload (the header, padded so payloads stay aligned).
constexpr int64_t kFrameHeader = (sizeof(WireHeader) + 63) / 64 * 64;

// "call 3 of jit_step (4096 elements of float32, sum, topology 4x2 across processes)".
using DescribeFn = std::string (*)(const WireHeader&);

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
// with *error when there is no MPI, it is not MPICH-ABI, it lacks MPI_THREAD_MULTIPLE,
// or its tags are too narrow for jax_ddl's streams.
bool MpiAttach(const std::vector<int64_t>& comm_handles, int64_t process, int64_t processes,
               std::string* error);

// Whether this build has the transport (MPI headers were found at build time).
bool MpiCompiledIn();

// Requests of failed calls that MPI could not cancel, still pending (tests, counters).
int64_t MpiAbandonedRequests();

// The cross-process traffic of one call on one local slot, driven by one thread.
//
// Tags: (call-site tag << 14) | (kind << 8) | sending slot, on the receiver's slot
// communicator. Two calls in flight at once on one slot always have different call
// sites (a device runs one program at a time), so their streams never mix; a clash of
// two sites' tags is detected and refused.
class MpiCall {
 public:
  static constexpr int kHandshake = 0;
  static constexpr int kDone = 1;
  static int ReduceScatter(int stage) { return 2 + stage; }
  static int AllGather(int stage) { return 2 + kMaxMpiStages + stage; }

  // Starts the call: takes the next sequence number of `label` on `slot`. Check ok().
  MpiCall(int64_t slot, const CallLabel& label, Clock::time_point deadline);
  ~MpiCall();
  MpiCall(const MpiCall&) = delete;
  MpiCall& operator=(const MpiCall&) = delete;

  // False (with why) when the transport is unusable or the call's tags clash.
  bool ok(Failure* failure) const;
  // Every wait also polls `failed` and gives up when it returns true (with *failure
  // filled in): a failure among this process's other devices ends the wait at once.
  void Watch(std::function<bool(Failure*)> failed);
  // Moves the deadline of every wait from now on.
  void SetDeadline(Clock::time_point deadline);
  int64_t seq() const { return seq_; }

  // Exchanges `mine` with the same slot of every other process and compares. Fails at
  // once when a process runs another call, has given up on this one, or disagrees on
  // any field (naming both values); fails at the deadline naming the processes that
  // never answered.
  bool Handshake(WireHeader mine, DescribeFn describe, Failure* failure);

  // One frame to / from device slot `slot` of `process`, of kind `kind`, for pipeline
  // chunk `chunk`: `frame` holds kFrameHeader bytes for the header (filled in here, for a
  // send) and then `bytes` of payload. It must stay valid until the request completed
  // (Wait, or Progress until Pending(chunk) is false), or be handed over by Abandon.
  void PostSend(int64_t process, int64_t slot, int kind, char* frame, int64_t bytes,
                int64_t chunk = 0);
  void PostRecv(int64_t process, int64_t slot, int kind, char* frame, int64_t bytes,
                int64_t chunk = 0);
  // Completes everything posted; verifies each message (call, stage, chunk, exact size).
  bool Wait(const char* stage, Failure* failure);
  // Without waiting: tests every posted request once (verifying what arrived like Wait).
  // 1 when some completed, 0 when none did, -1 on a failure, a failure of a watched
  // rendezvous, or the deadline passed with requests still pending (*failure says why,
  // naming the processes whose data did not come).
  int Progress(const char* stage, Failure* failure);
  // Whether requests of `chunk` are still pending (as of the last Wait or Progress).
  bool Pending(int64_t chunk) const;
  // Tells each of `peers` (process, slot) that this call is through and waits for the
  // same from them: MPI's progress is weak (a send may need its receiver to keep calling
  // MPI), and a call succeeds only if all its peers reached the end of it.
  bool Done(const std::vector<std::pair<int64_t, int64_t>>& peers, Failure* failure);
  // After a failure: cancels the receives; requests MPI cannot finish (a send cannot be
  // cancelled) keep their headers and `buffers` (moved out of the caller) alive until
  // they complete, checked at later calls.
  void Abandon(std::vector<std::vector<char>>* buffers);

 private:
  struct Impl;
  Impl* impl_;
  int64_t slot_;
  int64_t seq_ = 0;
};

}  // namespace jax_ddl
