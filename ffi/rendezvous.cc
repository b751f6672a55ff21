// Rendezvous, barriers with deadlines, failure quiescence, counters (see rendezvous.h).
#include "rendezvous.h"

#include <algorithm>
#include <cstdio>
#include <utility>

namespace jax_ddl {
namespace {

constexpr size_t kTombstones = 64;

std::string RankList(const std::vector<int64_t>& ranks) {
  std::string out = "[";
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(ranks[i]);
  }
  return out + "]";
}

std::string DescribeDescriptor(const Descriptor& d) {
  static const char* kOps[] = {"sum", "max", "min"};
  char buf[200];
  std::snprintf(buf, sizeof(buf), "%lld elements of %s in %lld buffer(s) (layout %llx), op %s",
                static_cast<long long>(d.count), d.dtype_name, static_cast<long long>(d.num_buffers),
                static_cast<unsigned long long>(d.layout_hash),
                (d.op >= 0 && d.op < 3) ? kOps[d.op] : "?");
  return buf;
}

}  // namespace

Clock::time_point Deadline(Clock::time_point start, int64_t timeout_ms) {
  if (timeout_ms < 0) return start + std::chrono::hours(24 * 365 * 100);
  return start + std::chrono::milliseconds(timeout_ms);
}

void Rendezvous::Reset(const RendezvousKey& key, int64_t size, const std::string& context) {
  key_ = key;
  size_ = size;
  context_.assign(context);  // reuses capacity: no allocation once warm
  members_.assign(size, Member{});
  reached_.assign(size, -1);
  phase_count_.assign(kMaxPhases, 0);
  working_.assign(size, 0);
  away_.assign(size, 0);
  num_working_ = 0;
  failed_ = false;
  failure_ = Failure{};
  joined_ = 0;
  left_ = 0;
}

void Rendezvous::SetWorking(int64_t rank, bool working) {
  if (working_[rank] == static_cast<char>(working)) return;
  working_[rank] = working;
  num_working_ += working ? 1 : -1;
  // Only a rank quiescing after a failure waits for this; a successful call's barriers
  // wake their waiters themselves.
  if (!working && num_working_ == 0 && failed_) cv_.notify_all();
}

int Rendezvous::WaitPhase(std::unique_lock<std::mutex>& lock, int64_t rank, int phase,
                          const char* stage, Clock::time_point deadline, Failure* failure,
                          Clock::time_point soft_until, Clock::time_point away_until) {
  while (phase_count_[phase] < size_ && !failed_) {
    const auto until = std::min(deadline, soft_until);
    if (cv_.wait_until(lock, until) == std::cv_status::timeout && phase_count_[phase] < size_ &&
        !failed_) {
      if (until < deadline) return 0;
      std::vector<int64_t> never, behind;
      bool all_away = true;
      for (int64_t r = 0; r < size_; ++r) {
        if (reached_[r] < 0) never.push_back(r);
        else if (reached_[r] < phase) behind.push_back(r);
        if (reached_[r] < phase) all_away = all_away && away_[r];
      }
      // They wait on other processes and will say which did not answer.
      if (all_away && deadline < away_until) {
        deadline = away_until;
        continue;
      }
      failed_ = true;
      failure_.deadline = true;
      std::string& msg = failure_.message;
      msg = context_ + ": timed out in stage '" + stage + "' (rank " + std::to_string(rank) +
            " waiting). ";
      if (!never.empty()) msg += "Missing ranks " + RankList(never) + " never arrived. ";
      if (!behind.empty()) {
        msg += "Ranks " + RankList(behind) + " arrived but did not reach stage '" + stage + "'";
        msg += all_away ? " (they wait on other processes). " : ". ";
      }
      msg += "Raise JAX_DDL_TIMEOUT if they are only slow.";
      cv_.notify_all();
    }
  }
  if (failed_) {
    *failure = failure_;
    return -1;
  }
  SetWorking(rank, true);
  return 1;
}

bool Rendezvous::Arrive(int64_t rank, const Member& me, Clock::time_point deadline,
                        Failure* failure) {
  return Publish(rank, me, failure) && AwaitAll(rank, deadline, deadline, failure) == 1;
}

bool Rendezvous::Publish(int64_t rank, const Member& me, Failure* failure) {
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) {
    *failure = failure_;
    return false;
  }
  if (reached_[rank] >= 0) {
    failed_ = true;
    failure_.message = context_ + ": rank " + std::to_string(rank) + " was claimed by device " +
               std::to_string(members_[rank].device) + " and by device " +
               std::to_string(me.device) +
               ". Each device must have its own rank in the reduced axes; a shard_map that "
               "leaves some mesh axes automatic is not supported.";
    cv_.notify_all();
    *failure = failure_;
    return false;
  }
  members_[rank] = me;
  reached_[rank] = 0;
  if (++phase_count_[0] == size_) cv_.notify_all();
  return true;
}

int Rendezvous::AwaitAll(int64_t rank, Clock::time_point soft_until, Clock::time_point deadline,
                         Failure* failure) {
  std::unique_lock<std::mutex> lock(mu_);
  const int status = WaitPhase(lock, rank, 0, "arrive", deadline, failure, soft_until);
  if (status <= 0) return status;
  const Descriptor& ref = members_[0].desc;
  for (int64_t r = 1; r < size_; ++r) {
    if (!(members_[r].desc == ref)) {
      // Every rank sees the same descriptors and fails here before touching any peer.
      SetWorking(rank, false);
      if (!failed_) {
        failed_ = true;
        failure_.deadline = false;
        failure_.message = context_ + ": ranks disagree on the operands: rank 0 has " +
                           DescribeDescriptor(ref) + ", rank " + std::to_string(r) + " has " +
                           DescribeDescriptor(members_[r].desc) +
                           ". Every rank must reduce the same shapes, dtypes and op.";
        cv_.notify_all();
      }
      *failure = failure_;
      return -1;
    }
  }
  return 1;
}

bool Rendezvous::Barrier(int64_t rank, int phase, const char* stage, Clock::time_point deadline,
                         Failure* failure, Clock::time_point away_until) {
  std::unique_lock<std::mutex> lock(mu_);
  SetWorking(rank, false);
  if (phase >= kMaxPhases) {
    if (!failed_) {  // every rank gets here: fail them all at once
      failed_ = true;
      failure_.deadline = false;
      failure_.message = context_ + ": the topology has more stages than the engine supports (" +
                         std::to_string(kMaxPhases - 1) + ")";
      cv_.notify_all();
    }
    *failure = failure_;
    return false;
  }
  reached_[rank] = phase;
  if (++phase_count_[phase] == size_) cv_.notify_all();
  return WaitPhase(lock, rank, phase, stage, deadline, failure, Clock::time_point::max(),
                   away_until) == 1;
}

void Rendezvous::Pause(int64_t rank) {
  std::lock_guard<std::mutex> lock(mu_);
  SetWorking(rank, false);
  away_[rank] = 1;
}

bool Rendezvous::Resume(int64_t rank, Failure* failure) {
  std::lock_guard<std::mutex> lock(mu_);
  away_[rank] = 0;
  if (failed_) {
    *failure = failure_;
    return false;
  }
  SetWorking(rank, true);
  return true;
}

void Rendezvous::Abort(int64_t rank, const Failure& failure) {
  std::lock_guard<std::mutex> lock(mu_);
  SetWorking(rank, false);
  if (!failed_) {
    failed_ = true;
    failure_ = failure;
  }
  cv_.notify_all();
}

bool Rendezvous::Failed(Failure* failure) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!failed_) return false;
  *failure = failure_;
  failure->local = true;
  return true;
}

bool Rendezvous::Quiesce(std::unique_lock<std::mutex>& lock, int64_t rank,
                         Clock::time_point until, Failure* failure) {
  SetWorking(rank, false);
  while (num_working_ > 0) {
    if (cv_.wait_until(lock, until) == std::cv_status::timeout && num_working_ > 0) {
      std::vector<int64_t> still;
      for (int64_t r = 0; r < size_; ++r) {
        if (working_[r]) still.push_back(r);
      }
      if (failure != nullptr) {
        failure->message += " (ranks " + RankList(still) +
                            " were still working on this call's buffers when rank " +
                            std::to_string(rank) + " gave up waiting for them)";
      }
      return false;
    }
  }
  return true;
}

Registry& Registry::Get() {
  static Registry* registry = new Registry();  // never destroyed: device threads may outlive exit
  return *registry;
}

Rendezvous* Registry::Join(const RendezvousKey& key, int64_t size, const std::string& context,
                           Failure* failure) {
  std::lock_guard<std::mutex> lock(mu_);
  for (Rendezvous* r : active_) {
    if (r->key_ == key && r->size_ == size) {
      ++r->joined_;
      return r;
    }
  }
  for (const Tombstone& t : tombstones_) {
    if (t.key == key) {
      failure->deadline = t.deadline;
      failure->message = "this call failed on the other ranks before this one arrived: " +
                         t.message;
      return nullptr;
    }
  }
  Rendezvous* r;
  if (!free_.empty()) {
    r = free_.back();
    free_.pop_back();
  } else {
    all_.push_back(std::make_unique<Rendezvous>());
    r = all_.back().get();
  }
  r->Reset(key, size, context);
  r->joined_ = 1;
  active_.push_back(r);
  return r;
}

bool Registry::Leave(Rendezvous* r, int64_t rank, Clock::time_point quiesce_until,
                     Failure* error) {
  bool failed;
  bool quiet = true;
  Failure failure;
  {
    std::unique_lock<std::mutex> rlock(r->mu_);
    failed = r->failed_;
    if (failed) {
      const auto t0 = Clock::now();
      quiet = r->Quiesce(rlock, rank, quiesce_until, error);
      GetCounters().quiesce_ns.fetch_add(
          std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count(),
          std::memory_order_relaxed);
      failure = r->failure_;
    } else {
      r->SetWorking(rank, false);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  ++r->left_;
  const bool last = r->left_ == r->joined_ && (r->joined_ == r->size_ || failed);
  if (failed && last) {
    if (tombstones_.size() < kTombstones) tombstones_.emplace_back();
    Tombstone& t = tombstones_[next_tombstone_++ % kTombstones];
    t.key = r->key_;
    t.message = failure.message;
    t.deadline = failure.deadline;
  }
  if (last) {
    active_.erase(std::find(active_.begin(), active_.end(), r));
    free_.push_back(r);
  }
  return quiet;
}

bool Registry::Fail(Rendezvous* r, int64_t rank, Failure* failure,
                    Clock::time_point quiesce_until) {
  r->Abort(rank, *failure);
  return Leave(r, rank, quiesce_until, failure);
}

void Counters::Reset() {
  for (auto* c : {&calls, &bytes, &errors, &small_calls, &arrive_ns, &reduce_scatter_ns,
                  &broadcast_ns, &small_ns, &stale_messages, &chunks, &quiesce_ns}) {
    c->store(0);
  }
}

Counters& GetCounters() {
  static Counters* counters = new Counters();
  return *counters;
}

namespace {
struct TraceState {
  std::mutex mu;
  std::atomic<bool> on{false};
  int64_t limit = 0;
  int64_t dropped = 0;
  std::vector<TraceEvent> events;
};
TraceState& Traces() {
  static TraceState* t = new TraceState();
  return *t;
}
}  // namespace

void TraceEnable(bool on, int64_t limit) {
  TraceState& t = Traces();
  std::lock_guard<std::mutex> lock(t.mu);
  if (on) {
    t.events.clear();
    t.dropped = 0;
    t.limit = std::max<int64_t>(0, limit);
  }
  t.on.store(on, std::memory_order_relaxed);
}

bool Tracing() { return Traces().on.load(std::memory_order_relaxed); }

void TraceRecord(TraceEvent event) {
  TraceState& t = Traces();
  std::lock_guard<std::mutex> lock(t.mu);
  if (!t.on.load(std::memory_order_relaxed)) return;
  if (static_cast<int64_t>(t.events.size()) >= t.limit) {
    ++t.dropped;
    return;
  }
  t.events.push_back(std::move(event));
}

std::vector<TraceEvent> TraceTake() {
  TraceState& t = Traces();
  std::lock_guard<std::mutex> lock(t.mu);
  std::vector<TraceEvent> out;
  out.swap(t.events);
  return out;
}

int64_t TraceDropped() {
  TraceState& t = Traces();
  std::lock_guard<std::mutex> lock(t.mu);
  return t.dropped;
}

int64_t TraceNanos(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

int64_t TraceNow() { return TraceNanos(Clock::now()); }

namespace {
struct FaultState {
  std::mutex mu;
  FaultKind kind = FaultKind::kNone;
  int64_t rank = -1;
  int64_t ms = 0;
  int64_t remaining = 0;
  std::atomic<bool> armed{false};
};
FaultState& Faults() {
  static FaultState* f = new FaultState();
  return *f;
}
}  // namespace

namespace {
std::mutex g_hold_mu;
std::condition_variable g_hold_cv;
int64_t g_hold_generation = 0;  // ReleaseHold() calls
int64_t g_hold_armed_at = 0;     // the generation when the hold fault was armed
std::atomic<int64_t> g_holds_released{0}, g_holds_expired{0};
}  // namespace

bool WaitHold(int64_t ms) {
  std::unique_lock<std::mutex> lock(g_hold_mu);
  // Released by any ReleaseHold() since the fault was armed, also one that came before
  // this call got here.
  const bool released = g_hold_cv.wait_for(lock, std::chrono::milliseconds(ms), [&] {
    return g_hold_generation != g_hold_armed_at;
  });
  (released ? g_holds_released : g_holds_expired).fetch_add(1);
  return released;
}

void ReleaseHold() {
  std::lock_guard<std::mutex> lock(g_hold_mu);
  ++g_hold_generation;
  g_hold_cv.notify_all();
}

int64_t HoldsReleased() { return g_holds_released.load(); }
int64_t HoldsExpired() { return g_holds_expired.load(); }

void SetFault(FaultKind kind, int64_t rank, int64_t ms, int64_t count) {
  if (kind == FaultKind::kHold) {
    std::lock_guard<std::mutex> lock(g_hold_mu);
    g_hold_armed_at = g_hold_generation;
  }
  FaultState& f = Faults();
  std::lock_guard<std::mutex> lock(f.mu);
  f.kind = kind;
  f.rank = rank;
  f.ms = ms;
  f.remaining = count;
  f.armed = kind != FaultKind::kNone && count != 0;
}

FaultKind TakeFault(int64_t rank, int64_t* ms) {
  FaultState& f = Faults();
  if (!f.armed.load(std::memory_order_relaxed)) return FaultKind::kNone;
  std::lock_guard<std::mutex> lock(f.mu);
  if (f.kind == FaultKind::kNone || f.remaining == 0 || (f.rank >= 0 && f.rank != rank)) {
    return FaultKind::kNone;
  }
  if (f.kind == FaultKind::kShort) return FaultKind::kNone;  // applied by the transport
  if (f.remaining > 0 && --f.remaining == 0) f.armed = false;
  *ms = f.ms;
  return f.kind;
}

bool FaultArmed(FaultKind kind, int64_t rank) {
  FaultState& f = Faults();
  if (!f.armed.load(std::memory_order_relaxed)) return false;
  std::lock_guard<std::mutex> lock(f.mu);
  return f.kind == kind && f.remaining != 0 && (f.rank < 0 || f.rank == rank);
}

}  // namespace jax_ddl
