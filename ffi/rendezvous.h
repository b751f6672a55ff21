// In-process rendezvous for the shared-memory (local) transport: devices of one process
// meet here, publish their buffers and descriptors, and pass deadline-bounded barriers.
// It also tracks which ranks are working on their peers' buffers, so that after a failure
// no rank returns (and lets XLA free its buffers) while a peer may still touch them.
// Also the counters and the test-only faults.
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

// Barrier phases one rendezvous supports (arrival is phase 0).
constexpr int kMaxPhases = 128;

// `start` + `timeout_ms`; a negative timeout means no limit (a deadline a century away).
Clock::time_point Deadline(Clock::time_point start, int64_t timeout_ms);

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
  char* staging = nullptr;         // contiguous copy of the inputs (small path; CUDA)
  uint64_t* flags = nullptr;       // CUDA: the rank's device-side barrier flags
  Clock::time_point deadline{};    // across processes: the rank's own deadline
};

struct RendezvousKey {
  int64_t run_id, site, group, occurrence;  // site: the call site's serial number
  bool operator==(const RendezvousKey& o) const {
    return run_id == o.run_id && site == o.site && group == o.group &&
           occurrence == o.occurrence;
  }
};

// Why a call failed: `deadline` for a wait that expired, else a disagreement or an error.
struct Failure {
  bool deadline = false;
  bool local = false;  // the rendezvous of this process failed (message says where)
  std::string message;
};

class Rendezvous {
 public:
  // Publishes `me` for `rank` and waits for all ranks (phase 0). Fails on a deadline,
  // a rank claimed twice, or descriptors that disagree; every rank sees the same error.
  // On success the rank is working (it may touch its peers' buffers).
  bool Arrive(int64_t rank, const Member& me, Clock::time_point deadline, Failure* failure);
  // Arrive in two steps: publish (fails if the rendezvous failed or the rank is claimed)...
  bool Publish(int64_t rank, const Member& me, Failure* failure);
  // ...then wait for all ranks: 1 when all arrived (and agree), -1 on failure, 0 when
  // `soft_until` passed first (no failure; wait again later, the rank stays published).
  int AwaitAll(int64_t rank, Clock::time_point soft_until, Clock::time_point deadline,
               Failure* failure);
  // Barrier `phase` (>= 1) among all ranks, bounded by `deadline`; `stage` names it in
  // errors. The rank stops working when it arrives and works again once all are through.
  // While every rank behind is paused (waiting on other processes, a wait bounded by its
  // own deadline, whose failure names the processes that did not answer), the barrier
  // keeps waiting for their verdict until `away_until`, so that the error every rank
  // reports names the missing process rather than a local rank that waits for it.
  bool Barrier(int64_t rank, int phase, const char* stage, Clock::time_point deadline,
               Failure* failure, Clock::time_point away_until = Clock::time_point::min());
  // The rank stops touching its peers' buffers for a while (it waits on other processes).
  void Pause(int64_t rank);
  // ...and starts again; false (with the failure) when the rendezvous failed meanwhile.
  bool Resume(int64_t rank, Failure* failure);
  // Records a failure of `rank`'s own (an MPI error, say) so every waiting rank stops.
  void Abort(int64_t rank, const Failure& failure);
  // Whether the rendezvous failed (then *failure says why), for ranks waiting elsewhere.
  bool Failed(Failure* failure);
  const Member& member(int64_t rank) const { return members_[rank]; }

 private:
  friend class Registry;
  void Reset(const RendezvousKey& key, int64_t size, const std::string& context);
  // 1: everyone reached `phase`; -1: failed (at `deadline`, or by another rank); 0:
  // `soft_until` came first.
  int WaitPhase(std::unique_lock<std::mutex>& lock, int64_t rank, int phase, const char* stage,
                Clock::time_point deadline, Failure* failure,
                Clock::time_point soft_until = Clock::time_point::max(),
                Clock::time_point away_until = Clock::time_point::min());
  void SetWorking(int64_t rank, bool working);
  // After a failure: waits (bounded) until no rank works on peers' buffers any more;
  // false if some still do at `until`.
  bool Quiesce(std::unique_lock<std::mutex>& lock, int64_t rank, Clock::time_point until,
               Failure* failure);

  RendezvousKey key_{};
  int64_t size_ = 0;
  std::string context_;  // "jax_ddl allreduce (call 3 of jit_step, topology 2x4, ...)"
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Member> members_;
  std::vector<int> reached_;      // highest phase each rank reached, -1 before arrival
  std::vector<int> phase_count_;  // ranks that reached each phase
  std::vector<char> working_;     // ranks that may be touching peers' buffers now
  std::vector<char> away_;        // ranks paused: waiting on other processes
  int64_t num_working_ = 0;
  bool failed_ = false;
  Failure failure_;
  int64_t joined_ = 0;
  int64_t left_ = 0;
};

// Live rendezvous, matched by key. Objects are pooled: no allocation once warm. The
// failures of the last few calls are remembered, so a rank that arrives after its call
// failed on the others fails at once with their error instead of waiting alone.
class Registry {
 public:
  static Registry& Get();
  // The rendezvous for `key`, created on first arrival; nullptr (with the failure) when
  // that call already failed on the ranks that came before.
  Rendezvous* Join(const RendezvousKey& key, int64_t size, const std::string& context,
                   Failure* failure);
  // Called once by every rank that joined, when it no longer touches the rendezvous.
  // A rank leaving a failed rendezvous first waits (up to `quiesce_until`) until no peer
  // works on its buffers any more; if they still do then, that is appended to *error and
  // Leave returns false.
  bool Leave(Rendezvous* r, int64_t rank, Clock::time_point quiesce_until,
             Failure* error = nullptr);
  // Like Leave after an error of its own (*failure): marks the rendezvous failed first.
  bool Fail(Rendezvous* r, int64_t rank, Failure* failure, Clock::time_point quiesce_until);

 private:
  struct Tombstone {
    RendezvousKey key{};
    std::string message;
    bool deadline = false;
  };
  std::mutex mu_;
  std::vector<Rendezvous*> active_;
  std::vector<std::unique_ptr<Rendezvous>> all_;
  std::vector<Rendezvous*> free_;
  std::vector<Tombstone> tombstones_;  // ring of the last failures
  size_t next_tombstone_ = 0;
};

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
  std::atomic<uint64_t> stale_messages{0};  // late messages of failed calls, discarded
  std::atomic<uint64_t> chunks{0};          // pipeline chunks of calls across processes
  std::atomic<uint64_t> quiesce_ns{0};  // failing ranks waiting for peers to stop writing
  void Reset();
};
Counters& GetCounters();

// A timeline of calls, kept only while tracing is on (off by default: then a call pays
// one relaxed load). One event per call per device, times in nanoseconds of the steady
// clock (TraceNow) so that Python can place its own marks on the same axis.
struct TraceEvent {
  std::string site;   // the call site's context ("jax_ddl allreduce (call 3 of jit_step, ...)")
  int64_t rank = 0;   // rank in the call's plan
  int64_t device = 0; // local device ordinal
  int64_t bytes = 0;  // bytes this device reduced
  int64_t start_ns = 0;  // the handler was entered (XLA reached the call)
  int64_t met_ns = 0;    // every rank had arrived (0: never, the call failed first)
  int64_t end_ns = 0;    // the call completed (its future became ready)
  bool ok = true;
  bool deferred = false;  // completed on a jax_ddl thread, not on XLA's
};
// Turns tracing on (clearing earlier events) or off; at most `limit` events are kept
// (the first ones), `TraceDropped` counts the rest.
void TraceEnable(bool on, int64_t limit);
bool Tracing();
void TraceRecord(TraceEvent event);
std::vector<TraceEvent> TraceTake();  // the events so far; clears them
int64_t TraceDropped();
int64_t TraceNow();
// A steady-clock time point in the nanoseconds TraceNow counts.
int64_t TraceNanos(Clock::time_point t);

// Test-only faults, so the tests drive the paths real faults take. `rank` -1: every rank
// of this process. Each fault fires `count` times (-1: until cleared).
enum class FaultKind : int {
  kNone = 0,
  kSkip = 1,   // return success without taking part
  kLie = 2,    // misreport the element count
  kDelay = 3,  // arrive `ms` late
  kStall = 4,  // after arriving, keep working on the peers' buffers for `ms`
  kShort = 5,  // send every cross-process data message one element short
  kHold = 6,   // arrive only once ReleaseHold() is called (or after `ms`); calls inside
               // one process only
};
void SetFault(FaultKind kind, int64_t rank, int64_t ms, int64_t count);
// The fault to apply to this call of `rank`, consuming one firing.
FaultKind TakeFault(int64_t rank, int64_t* ms);
// Whether `kind` is armed for `rank` (without consuming it).
bool FaultArmed(FaultKind kind, int64_t rank);
// kHold: waits until ReleaseHold() is called or `ms` passed; true if it was released.
bool WaitHold(int64_t ms);
void ReleaseHold();
// Holds ended by ReleaseHold(), and by their time running out, since the process started.
int64_t HoldsReleased();
int64_t HoldsExpired();

}  // namespace jax_ddl
