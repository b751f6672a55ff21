// In-process rendezvous for the shared-memory (local) transport: devices of one process
// meet here, publish their buffers and descriptors, and pass deadline-bounded barriers.
// Also the per-call-site state that persists across calls, the counters and test faults.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "topology.h"

namespace jax_ddl {

using Clock = std::chrono::steady_clock;

// What every rank must agree on; exchanged at arrival and compared on every rank.
struct Descriptor {
  int64_t count = 0;        // total elements over all buffers
  int64_t num_buffers = 0;
  int64_t layout_hash = 0;  // hash of the per-buffer element counts
  int32_t dtype = 0;        // XLA FFI data type
  int32_t op = 0;
  const char* dtype_name = "";  // for messages only; not compared
  bool operator==(const Descriptor& o) const {
    return count == o.count && num_buffers == o.num_buffers && layout_hash == o.layout_hash &&
           dtype == o.dtype && op == o.op;
  }
};

// Published by a rank at arrival. Pointers stay valid until that rank leaves the call
// (large path: after the exit barrier) or until its next call at the same site (small path).
struct Member {
  int64_t device = -1;
  Descriptor desc;
  char* const* inputs = nullptr;   // one pointer per buffer
  char* const* outputs = nullptr;  // one pointer per buffer
  char* inter = nullptr;           // contiguous accumulator scratch, or nullptr
  char* staging = nullptr;         // contiguous copy of the inputs (small path)
};

struct RendezvousKey {
  int64_t run_id, call_id, group, occurrence;
  bool operator==(const RendezvousKey& o) const {
    return run_id == o.run_id && call_id == o.call_id && group == o.group &&
           occurrence == o.occurrence;
  }
};

// Why a rendezvous failed: `deadline` for a wait that expired, else a disagreement.
struct Failure {
  bool deadline = false;
  std::string message;
};

class Rendezvous {
 public:
  // Publishes `me` for `rank` and waits for all ranks (phase 0). Fails on a deadline,
  // a rank claimed twice, or descriptors that disagree; every rank sees the same error.
  bool Arrive(int64_t rank, const Member& me, Clock::time_point deadline, Failure* failure);
  // Barrier `phase` (>= 1) among all ranks, bounded by `deadline`; `stage` names it in errors.
  bool Barrier(int64_t rank, int phase, const char* stage, Clock::time_point deadline,
               Failure* failure);
  const Member& member(int64_t rank) const { return members_[rank]; }

 private:
  friend class Registry;
  void Reset(const RendezvousKey& key, int64_t size, const std::string& context);
  bool WaitPhase(std::unique_lock<std::mutex>& lock, int64_t rank, int phase, const char* stage,
                 Clock::time_point deadline, Failure* failure);

  RendezvousKey key_{};
  int64_t size_ = 0;
  std::string context_;  // "jax_ddl allreduce (call 3, group 0, topology 2x4)"
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Member> members_;
  std::vector<int> reached_;      // highest phase each rank reached, -1 before arrival
  std::vector<int> phase_count_;  // ranks that reached each phase
  bool failed_ = false;
  Failure failure_;
  int64_t joined_ = 0;
  int64_t left_ = 0;
};

// Live rendezvous, matched by key. Objects are pooled: no allocation once warm.
class Registry {
 public:
  static Registry& Get();
  // The rendezvous for `key`, created on first arrival.
  Rendezvous* Join(const RendezvousKey& key, int64_t size, const std::string& context);
  // Called once by every rank that joined, when it no longer touches the rendezvous.
  void Leave(Rendezvous* r);

 private:
  std::mutex mu_;
  std::vector<Rendezvous*> active_;
  std::vector<std::unique_ptr<Rendezvous>> all_;
  std::vector<Rendezvous*> free_;
};

// State of one call site on one device, kept across calls.
struct SiteState {
  int64_t last_run_id = -1;
  int64_t occurrence = 0;  // calls of this site within the current run
  uint64_t sequence = 0;   // calls of this site ever; picks the staging half
  std::vector<char*> inputs, outputs;
  std::vector<char> staging[2];
  std::vector<char> inter;
  std::vector<char> accum;
  std::vector<const char*> peer_ptrs;
  std::vector<char*> dst_ptrs;
  std::vector<int64_t> offsets;  // prefix sums of the buffers' element counts
  std::vector<int64_t> plan_dims;
  Plan plan;
  std::string context;  // names the call in errors
  // Across processes: the plan splits into local dimensions (shared memory) and process
  // dimensions (MPI); this device's slice travels through `proc_buf`.
  bool cross = false;
  Plan local_plan, proc_plan;
  std::vector<char> proc_buf, proc_scratch;
  // Across processes with groups that span them (e.g. a flat spec): the whole plan runs
  // stage by stage, local peers in shared memory and remote ones over MPI.
  bool spanning = false;
  std::vector<int64_t> handshake_procs;  // processes any local rank exchanges with
  std::vector<char> recv_buf;
};

// The site state of (device, call_id); created on first use.
SiteState& GetSiteState(int64_t device, int64_t call_id);

// Process-wide counters, readable from Python.
struct Counters {
  std::atomic<uint64_t> calls{0};
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> errors{0};
  std::atomic<uint64_t> small_calls{0};
  std::atomic<uint64_t> arrive_ns{0};
  std::atomic<uint64_t> reduce_scatter_ns{0};
  std::atomic<uint64_t> broadcast_ns{0};
  std::atomic<uint64_t> small_ns{0};
  void Reset();
};
Counters& GetCounters();

// Test-only faults, so the tests drive the paths real faults take.
enum class FaultKind : int { kNone = 0, kSkip = 1, kLie = 2 };
struct Fault {
  std::atomic<int> kind{0};
  std::atomic<int64_t> rank{-1};
};
Fault& GetFault();

}  // namespace jax_ddl
