// Rendezvous, barriers with deadlines, per-site state, counters (see rendezvous.h).
#include "rendezvous.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <utility>

namespace jax_ddl {
namespace {

constexpr int kMaxPhases = 128;

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

void Rendezvous::Reset(const RendezvousKey& key, int64_t size, const std::string& context) {
  key_ = key;
  size_ = size;
  context_.assign(context);  // reuses capacity: no allocation once warm
  members_.assign(size, Member{});
  reached_.assign(size, -1);
  phase_count_.assign(kMaxPhases, 0);
  failed_ = false;
  failure_ = Failure{};
  joined_ = 0;
  left_ = 0;
}

bool Rendezvous::WaitPhase(std::unique_lock<std::mutex>& lock, int64_t rank, int phase,
                           const char* stage, Clock::time_point deadline, Failure* failure) {
  while (phase_count_[phase] < size_ && !failed_) {
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && phase_count_[phase] < size_ &&
        !failed_) {
      std::vector<int64_t> never, behind;
      for (int64_t r = 0; r < size_; ++r) {
        if (reached_[r] < 0) never.push_back(r);
        else if (reached_[r] < phase) behind.push_back(r);
      }
      failed_ = true;
      failure_.deadline = true;
      std::string& msg = failure_.message;
      msg = context_ + ": timed out in stage '" + stage + "' (rank " + std::to_string(rank) +
            " waiting). ";
      if (!never.empty()) msg += "Missing ranks " + RankList(never) + " never arrived. ";
      if (!behind.empty()) {
        msg += "Ranks " + RankList(behind) + " arrived but did not reach stage '" + stage + "'. ";
      }
      msg += "Raise JAX_DDL_TIMEOUT if they are only slow.";
      cv_.notify_all();
    }
  }
  if (failed_) {
    *failure = failure_;
    return false;
  }
  return true;
}

bool Rendezvous::Arrive(int64_t rank, const Member& me, Clock::time_point deadline,
                        Failure* failure) {
  std::unique_lock<std::mutex> lock(mu_);
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
  if (!WaitPhase(lock, rank, 0, "arrive", deadline, failure)) return false;
  const Descriptor& ref = members_[0].desc;
  for (int64_t r = 1; r < size_; ++r) {
    if (!(members_[r].desc == ref)) {
      failure->deadline = false;
      failure->message = context_ + ": ranks disagree on the operands: rank 0 has " +
               DescribeDescriptor(ref) + ", rank " + std::to_string(r) + " has " +
               DescribeDescriptor(members_[r].desc) +
               ". Every rank must reduce the same shapes, dtypes and op.";
      return false;
    }
  }
  return true;
}

bool Rendezvous::Barrier(int64_t rank, int phase, const char* stage, Clock::time_point deadline,
                         Failure* failure) {
  std::unique_lock<std::mutex> lock(mu_);
  if (phase >= kMaxPhases) {
    failure->message = context_ + ": the topology has more stages than the engine supports (" +
                       std::to_string(kMaxPhases - 1) + ")";
    return false;
  }
  reached_[rank] = phase;
  if (++phase_count_[phase] == size_) cv_.notify_all();
  return WaitPhase(lock, rank, phase, stage, deadline, failure);
}

Registry& Registry::Get() {
  static Registry* registry = new Registry();  // never destroyed: device threads may outlive exit
  return *registry;
}

Rendezvous* Registry::Join(const RendezvousKey& key, int64_t size, const std::string& context) {
  std::lock_guard<std::mutex> lock(mu_);
  for (Rendezvous* r : active_) {
    if (r->key_ == key && r->size_ == size) {
      ++r->joined_;
      return r;
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

void Registry::Leave(Rendezvous* r) {
  std::lock_guard<std::mutex> lock(mu_);
  bool failed;
  {
    std::lock_guard<std::mutex> rlock(r->mu_);
    failed = r->failed_;
  }
  ++r->left_;
  if (r->left_ == r->joined_ && (r->joined_ == r->size_ || failed)) {
    active_.erase(std::find(active_.begin(), active_.end(), r));
    free_.push_back(r);
  }
}

SiteState& GetSiteState(int64_t device, int64_t call_id) {
  static std::mutex* mu = new std::mutex();
  static auto* sites = new std::map<std::pair<int64_t, int64_t>, SiteState>();
  std::lock_guard<std::mutex> lock(*mu);
  return (*sites)[{device, call_id}];
}

void Counters::Reset() {
  for (auto* c : {&calls, &bytes, &errors, &small_calls, &arrive_ns, &reduce_scatter_ns,
                  &broadcast_ns, &small_ns}) {
    c->store(0);
  }
}

Counters& GetCounters() {
  static Counters* counters = new Counters();
  return *counters;
}

Fault& GetFault() {
  static Fault* fault = new Fault();
  return *fault;
}

}  // namespace jax_ddl
