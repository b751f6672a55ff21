// MPI transport (see mpi_transport.h). Point-to-point messages polled against deadlines:
// blocking collectives cannot time out, and a peer that never arrives must make the call
// fail with its rank named, not hang. Reductions are jax_ddl's (plan order); MPI only
// moves frames between jax_ddl's own buffers.
#include "mpi_transport.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#if JAX_DDL_HAVE_MPI
#include <mpi.h>
#endif

namespace jax_ddl {
namespace {

constexpr uint32_t kMagic = 0x4a444432;  // "JDD2"

ProcessLayout g_layout;
std::atomic<bool> g_attached{false};  // set (release) after everything above is in place

std::string Join(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// "ranks 4-7, 12-15": the global ranks (devices) of the given processes.
std::string RanksOf(const std::vector<int64_t>& processes) {
  const int64_t l = g_layout.slots;
  std::string s = processes.size() == 1 && l == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < processes.size(); ++i) {
    const int64_t first = processes[i] * l;
    s += (i ? ", " : "") + std::to_string(first);
    if (l > 1) s += "-" + std::to_string(first + l - 1);
  }
  return s;
}

int SiteTag(const CallLabel& l) { return static_cast<int>((l.site + l.copy * 4099) & 0x7fff); }

int Tag(int site_tag, int kind, int64_t sender_slot) {
  return (site_tag << 14) | (kind << 8) | static_cast<int>(sender_slot);
}

bool SameLabel(const WireHeader& h, const CallLabel& l) {
  return h.module_hash == l.module_hash && h.site == l.site && h.copy == l.copy;
}

const char* ModeName(int32_t mode) {
  switch (mode) {
    case 1: return "across processes";
    case 2: return "spanning processes";
    default: return "inside one process";
  }
}

std::string TopologyOf(const WireHeader& h) {
  std::vector<int64_t> dims(h.dims, h.dims + std::min(h.ndims, kWireDims));
  std::string s = FormatTopology(dims);
  if (h.ndims > kWireDims) s += "x...";
  return s + " (" + ModeName(h.mode) + ")";
}

// Why `theirs` (from `process`) is not the call `mine` describes, or "" if it is.
std::string Disagreement(const WireHeader& mine, const WireHeader& theirs, int64_t process,
                         DescribeFn describe) {
  const std::string who = "process " + std::to_string(process);
  if (mine.ndims != theirs.ndims || mine.dims_hash != theirs.dims_hash ||
      !std::equal(mine.dims, mine.dims + kWireDims, theirs.dims) || mine.mode != theirs.mode) {
    return "processes disagree on the topology of " + describe(mine) + ": this process uses " +
           TopologyOf(mine) + ", " + who + " uses " + TopologyOf(theirs) +
           ". Give every process the same topology= and JAX_DDL_TOPOLOGY";
  }
  if (mine.count != theirs.count || mine.num_buffers != theirs.num_buffers ||
      mine.layout_hash != theirs.layout_hash || mine.dtype != theirs.dtype ||
      mine.op != theirs.op) {
    return "processes disagree on the call: this process has " + describe(mine) + ", " + who +
           " has " + describe(theirs) +
           "; every process must run the same program on the same shapes";
  }
  if (mine.chunks != theirs.chunks) {
    return "processes disagree on how " + describe(mine) + " is pipelined: this process cuts " +
           "it into " + std::to_string(mine.chunks) + " chunks, " + who + " into " +
           std::to_string(theirs.chunks) + ". Give every process the same JAX_DDL_CHUNK_BYTES";
  }
  return "";
}

#if JAX_DDL_HAVE_MPI
struct Api {
  decltype(&MPI_Isend) isend;
  decltype(&MPI_Irecv) irecv;
  decltype(&MPI_Recv) recv;
  decltype(&MPI_Test) test;
  decltype(&MPI_Iprobe) iprobe;
  decltype(&MPI_Cancel) cancel;
  decltype(&MPI_Get_count) get_count;
  decltype(&MPI_Error_class) error_class;
  decltype(&MPI_Error_string) error_string;
  decltype(&MPI_Comm_get_attr) comm_get_attr;
  decltype(&MPI_Query_thread) query_thread;
};
Api g_api;
std::vector<MPI_Comm> g_comms;

template <typename F>
bool Bind(void* lib, const char* name, F* fn, std::string* error) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  if (*fn == nullptr) *error = std::string("the MPI library has no ") + name;
  return *fn != nullptr;
}

std::string MpiErrorText(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (g_api.error_string(rc, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
  return std::string(text, len);
}

// After an MPI error (as opposed to a slow peer) the communicators cannot be trusted:
// every later call fails at once with the first error.
std::mutex g_poison_mu;
std::string g_poison;

void Poison(const std::string& why) {
  std::lock_guard<std::mutex> lock(g_poison_mu);
  if (g_poison.empty()) g_poison = why;
}

bool Poisoned(std::string* why) {
  std::lock_guard<std::mutex> lock(g_poison_mu);
  *why = g_poison;
  return !g_poison.empty();
}

// Which call holds each (slot, call-site tag), how often each call site ran on each slot,
// and handshake headers that arrived for a call this process has not reached yet.
struct Book {
  std::mutex mu;
  std::map<std::pair<int64_t, int>, CallLabel> tags;
  std::map<std::tuple<int64_t, uint64_t, int64_t, int64_t>, int64_t> seqs;
  std::map<std::tuple<int64_t, int64_t, int>, std::deque<WireHeader>> stash;
};
constexpr size_t kStashPerStream = 16;  // headers kept per (slot, process, tag)

Book& GetBook() {
  static Book* book = new Book();
  return *book;
}

void Stash(int64_t slot, int64_t process, int site_tag, const WireHeader& h) {
  Book& book = GetBook();
  std::lock_guard<std::mutex> lock(book.mu);
  auto& kept = book.stash[{slot, process, site_tag}];
  kept.push_back(h);
  if (kept.size() > kStashPerStream) kept.pop_front();
}

// The stashed header of `label` from `process` with the lowest attempt, removing it and
// any older attempts of that label; headers of other calls stay.
bool Unstash(int64_t slot, int64_t process, int site_tag, const CallLabel& label, int64_t seq,
             WireHeader* out) {
  Book& book = GetBook();
  std::lock_guard<std::mutex> lock(book.mu);
  auto it = book.stash.find({slot, process, site_tag});
  if (it == book.stash.end()) return false;
  auto& kept = it->second;
  bool found = false;
  for (auto h = kept.begin(); h != kept.end();) {
    if (!SameLabel(*h, label)) {
      ++h;
      continue;
    }
    if (h->seq < seq) {  // an attempt this process has passed: late, drop it
      h = kept.erase(h);
      GetCounters().stale_messages.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (!found || h->seq < out->seq) {
      *out = *h;
      found = true;
    }
    ++h;
  }
  if (found) {
    for (auto h = kept.begin(); h != kept.end(); ++h) {
      if (SameLabel(*h, label) && h->seq == out->seq) {
        kept.erase(h);
        break;
      }
    }
  }
  if (kept.empty()) book.stash.erase(it);
  return found;
}

// Requests of failed calls that MPI could not cancel, with everything they touch.
struct Grave {
  std::vector<MPI_Request> reqs;
  std::deque<std::vector<char>> frames;
  std::vector<std::vector<char>> buffers;
};
std::mutex g_grave_mu;
std::vector<std::unique_ptr<Grave>> g_graves;
std::atomic<int64_t> g_abandoned{0};

void SweepGraves() {
  std::lock_guard<std::mutex> lock(g_grave_mu);
  for (size_t i = 0; i < g_graves.size();) {
    Grave& g = *g_graves[i];
    bool all = true;
    for (MPI_Request& r : g.reqs) {
      if (r == MPI_REQUEST_NULL) continue;
      int flag = 0;
      g_api.test(&r, &flag, MPI_STATUS_IGNORE);  // errors: the request is over either way
      if (flag) {
        r = MPI_REQUEST_NULL;
        g_abandoned.fetch_sub(1);
      } else {
        all = false;
      }
    }
    if (all) {
      g_graves.erase(g_graves.begin() + i);
    } else {
      ++i;
    }
  }
}
#endif

}  // namespace

bool MpiCompiledIn() { return JAX_DDL_HAVE_MPI != 0; }
bool MpiAttached() { return g_attached.load(std::memory_order_acquire); }
const ProcessLayout& MpiLayout() { return g_layout; }

int64_t MpiAbandonedRequests() {
#if JAX_DDL_HAVE_MPI
  if (MpiAttached()) SweepGraves();
  return g_abandoned.load();
#else
  return 0;
#endif
}

bool MpiAttach(const std::vector<int64_t>& comm_handles, int64_t process, int64_t processes,
               std::string* error) {
#if JAX_DDL_HAVE_MPI
  if (MpiAttached()) {  // calls in flight use the communicators: never swap them
    *error = "jax_ddl's MPI transport is already attached in this process";
    return false;
  }
  void* lib = dlopen("libmpi.so.12", RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
  if (lib == nullptr) {
    *error = "no MPICH-ABI MPI library (libmpi.so.12) is loaded in this process; import "
             "mpi4py.MPI (from the mpi extra: mpi4py and mpich) before attaching";
    return false;
  }
  Api api{};
  if (!Bind(lib, "MPI_Isend", &api.isend, error) || !Bind(lib, "MPI_Irecv", &api.irecv, error) ||
      !Bind(lib, "MPI_Recv", &api.recv, error) || !Bind(lib, "MPI_Test", &api.test, error) ||
      !Bind(lib, "MPI_Iprobe", &api.iprobe, error) ||
      !Bind(lib, "MPI_Cancel", &api.cancel, error) ||
      !Bind(lib, "MPI_Get_count", &api.get_count, error) ||
      !Bind(lib, "MPI_Error_class", &api.error_class, error) ||
      !Bind(lib, "MPI_Error_string", &api.error_string, error) ||
      !Bind(lib, "MPI_Comm_get_attr", &api.comm_get_attr, error) ||
      !Bind(lib, "MPI_Query_thread", &api.query_thread, error)) {
    return false;
  }
  int provided = 0;
  api.query_thread(&provided);
  if (provided != MPI_THREAD_MULTIPLE) {
    *error = "MPI was initialised without MPI_THREAD_MULTIPLE (level " +
             std::to_string(provided) + "); jax_ddl's threads call it concurrently";
    return false;
  }
  if (static_cast<int64_t>(comm_handles.size()) > kMaxSlots) {
    *error = "at most " + std::to_string(kMaxSlots) + " local devices per process can attach";
    return false;
  }
  for (int64_t h : comm_handles) {
    int* tag_ub = nullptr;
    int flag = 0;
    api.comm_get_attr(static_cast<MPI_Comm>(h), MPI_TAG_UB, &tag_ub, &flag);
    const int need = Tag(0x7fff, 2 + 2 * kMaxMpiStages - 1, kMaxSlots - 1);
    if (!flag || tag_ub == nullptr || *tag_ub < need) {
      *error = "this MPI's largest tag (MPI_TAG_UB = " +
               std::to_string(flag && tag_ub ? *tag_ub : -1) + ") is below the " +
               std::to_string(need) + " jax_ddl's message streams need; use MPICH";
      return false;
    }
  }
  g_comms.clear();
  for (int64_t h : comm_handles) g_comms.push_back(static_cast<MPI_Comm>(h));
  g_api = api;
  g_layout = ProcessLayout{process, processes, static_cast<int64_t>(comm_handles.size())};
  g_attached.store(true, std::memory_order_release);
  return true;
#else
  *error = "this build of jax_ddl has no MPI transport (no MPI headers were found when it "
           "was built); reinstall with the mpich package present";
  return false;
#endif
}

#if JAX_DDL_HAVE_MPI

struct MpiCall::Impl {
  CallLabel label;
  int site_tag = 0;
  Clock::time_point deadline;
  std::string error;  // why the call cannot start, if it cannot
  bool reserved = false;

  // An expected incoming frame.
  struct Recv {
    int64_t process, slot;
    int kind;
    char* frame;
    int64_t bytes;
    int64_t chunk = 0;
    MPI_Request req = MPI_REQUEST_NULL;
    bool done = false;
    bool posted = false;  // handed to MPI (a stream's later frames wait their turn)
    bool SameStream(const Recv& o) const {
      return process == o.process && slot == o.slot && kind == o.kind;
    }
  };
  struct Send {
    MPI_Request req = MPI_REQUEST_NULL;
    int64_t process = 0;
    int64_t chunk = 0;
  };
  std::vector<Recv> recvs;
  std::vector<Send> sends;
  int64_t left = 0;                   // posted requests not complete yet
  std::vector<int64_t> received;      // frames taken from each process in this call
  std::vector<char> met;              // processes whose handshake of this call came
  std::deque<std::vector<char>> own;  // handshake and done frames
  std::string post_error;             // the first failure to post, reported by Wait
  std::function<bool(Failure*)> watch;

  // Tests every pending request once: -1 on a failure, else how many completed.
  int Sweep(int64_t my_slot, const char* stage, const WireHeader& me, Failure* failure);
  // The watched rendezvous failed, or the deadline passed (*failure says why).
  bool GiveUp(const char* stage, Failure* failure);
  void Clear() {
    recvs.clear();
    sends.clear();
    left = 0;
  }

  void Post(Recv& r, int64_t my_slot) {
    r.done = false;
    r.posted = true;
    const int rc = g_api.irecv(r.frame, static_cast<int>(kFrameHeader + r.bytes), MPI_BYTE,
                               static_cast<int>(r.process), Tag(site_tag, r.kind, r.slot),
                               g_comms[my_slot], &r.req);
    if (rc != MPI_SUCCESS && post_error.empty()) {
      post_error = "MPI error posting a receive from process " + std::to_string(r.process) +
                   ": " + MpiErrorText(rc);
      Poison(post_error);
    }
  }
};

MpiCall::MpiCall(int64_t slot, const CallLabel& label, Clock::time_point deadline)
    : impl_(new Impl()), slot_(slot) {
  Impl& m = *impl_;
  m.label = label;
  m.site_tag = SiteTag(label);
  m.deadline = deadline;
  if (!MpiAttached() || slot < 0 || slot >= static_cast<int64_t>(g_comms.size())) {
    m.error = "no MPI communicator for local slot " + std::to_string(slot);
    return;
  }
  SweepGraves();
  std::string poison;
  if (Poisoned(&poison)) {
    m.error = "the MPI transport failed earlier and cannot be used safely any more (" +
              poison + "); restart the job";
    return;
  }
  Book& book = GetBook();
  std::lock_guard<std::mutex> lock(book.mu);
  auto [it, fresh] = book.tags.emplace(std::make_pair(slot, m.site_tag), label);
  if (!fresh) {
    const CallLabel& other = it->second;
    m.error = "call sites " + std::to_string(label.site) + " (copy " + std::to_string(label.copy) +
              ") and " + std::to_string(other.site) + " (copy " + std::to_string(other.copy) +
              ") of this program are in flight at once on local device " +
              std::to_string(slot) + " and share MPI tags; a program may hold up to 4099 "
              "jax_ddl call sites with up to 7 copies each";
    return;
  }
  m.reserved = true;
  seq_ = book.seqs[{slot, label.module_hash, label.site, label.copy}]++;
}

MpiCall::~MpiCall() {
  Impl& m = *impl_;
  if (!m.sends.empty() || !m.recvs.empty()) Abandon(nullptr);
  if (m.reserved) {
    Book& book = GetBook();
    std::lock_guard<std::mutex> lock(book.mu);
    book.tags.erase({slot_, m.site_tag});
  }
  delete impl_;
}

void MpiCall::Watch(std::function<bool(Failure*)> failed) { impl_->watch = std::move(failed); }
void MpiCall::SetDeadline(Clock::time_point deadline) { impl_->deadline = deadline; }

bool MpiCall::ok(Failure* failure) const {
  if (impl_->error.empty()) return true;
  failure->deadline = false;
  failure->message = impl_->error;
  return false;
}

void MpiCall::PostSend(int64_t process, int64_t slot, int kind, char* frame, int64_t bytes,
                       int64_t chunk) {
  Impl& m = *impl_;
  WireHeader h;
  h.magic = kMagic;
  h.kind = static_cast<uint32_t>(kind);
  h.module_hash = m.label.module_hash;
  h.site = m.label.site;
  h.copy = m.label.copy;
  h.seq = seq_;
  h.payload_bytes = bytes;
  h.chunk = chunk;
  std::memcpy(frame, &h, sizeof(h));
  int64_t total = kFrameHeader + bytes;
  if (bytes > 0 && FaultArmed(FaultKind::kShort, -1)) total -= 1;  // test fault: a short frame
  if (total > INT_MAX) {
    if (m.post_error.empty()) {
      m.post_error = "a message of " + std::to_string(total) +
                     " bytes exceeds MPI's int count; reduce fewer bytes per call";
    }
    return;
  }
  MPI_Request r;
  const int rc = g_api.isend(frame, static_cast<int>(total), MPI_BYTE, static_cast<int>(process),
                             Tag(m.site_tag, kind, slot_), g_comms[slot], &r);
  if (rc != MPI_SUCCESS) {
    if (m.post_error.empty()) {
      m.post_error = "MPI error posting a send to process " + std::to_string(process) + ": " +
                     MpiErrorText(rc);
      Poison(m.post_error);
    }
    return;
  }
  m.sends.push_back(Impl::Send{r, process, chunk});
  ++m.left;
}

void MpiCall::PostRecv(int64_t process, int64_t slot, int kind, char* frame, int64_t bytes,
                       int64_t chunk) {
  Impl& m = *impl_;
  if (kFrameHeader + bytes > INT_MAX) {
    if (m.post_error.empty()) {
      m.post_error = "a message of " + std::to_string(kFrameHeader + bytes) +
                     " bytes exceeds MPI's int count; reduce fewer bytes per call";
    }
    return;
  }
  // One receive per stream (process, slot, kind) in MPI at a time: MPI matches a stream's
  // messages to its receives in the order they were posted, and a receive that took a late
  // frame of an abandoned call is posted again. Were a later frame's receive posted
  // already, it would take this one's message.
  Impl::Recv r{process, slot, kind, frame, bytes, chunk};
  bool busy = false;
  for (const Impl::Recv& o : m.recvs) busy = busy || (!o.done && o.SameStream(r));
  m.recvs.push_back(r);
  ++m.left;
  if (!busy) m.Post(m.recvs.back(), slot_);
}

int MpiCall::Impl::Sweep(int64_t my_slot, const char* stage, const WireHeader& me,
                         Failure* failure) {
  failure->deadline = false;
  if (!post_error.empty()) {
    failure->message = post_error + " (" + stage + ")";
    return -1;
  }
  auto fatal = [&](int rc, int64_t process) {
    failure->message = "MPI error during the " + std::string(stage) + " with process " +
                       std::to_string(process) + ": " + MpiErrorText(rc);
    Poison(failure->message);
    return -1;
  };
  int completed = 0;
  for (Send& snd : sends) {
    if (snd.req == MPI_REQUEST_NULL) continue;
    int flag = 0;
    const int rc = g_api.test(&snd.req, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return fatal(rc, snd.process);
    if (flag) {
      snd.req = MPI_REQUEST_NULL;
      --left;
      ++completed;
    }
  }
  // The stream's next receive, once `r` completed.
  auto post_next = [&](const Recv& r) {
    for (Recv& o : recvs) {
      if (!o.done && !o.posted && o.SameStream(r)) {
        Post(o, my_slot);
        return;
      }
    }
  };
  for (size_t i = 0; i < recvs.size(); ++i) {
    Recv& r = recvs[i];
    if (r.done || !r.posted) continue;
    int flag = 0;
    MPI_Status status;
    int rc = g_api.test(&r.req, &flag, &status);
    bool truncated = false;
    if (rc != MPI_SUCCESS) {
      int cls = 0;
      g_api.error_class(rc, &cls);
      if (cls != MPI_ERR_TRUNCATE) return fatal(rc, r.process);
      truncated = true;  // a longer message than expected: its header says whose
      flag = 1;
    }
    if (!flag) continue;
    r.req = MPI_REQUEST_NULL;
    int got = -1;
    if (!truncated) g_api.get_count(&status, MPI_BYTE, &got);
    WireHeader h;
    std::memcpy(&h, r.frame, sizeof(h));
    const bool ours = got >= static_cast<int>(sizeof(WireHeader)) || truncated;
    if (ours && h.magic == kMagic && (!SameLabel(h, label) || h.seq < me.seq)) {
      // A late frame of a call this process gave up on (a frame is sent only after
      // both ends agreed in a handshake, so another call's frame on this stream is
      // late too): drop it, wait for ours.
      GetCounters().stale_messages.fetch_add(1, std::memory_order_relaxed);
      Post(r, my_slot);
      if (!post_error.empty()) {
        failure->message = post_error;
        return -1;
      }
      continue;
    }
    const int64_t want = kFrameHeader + r.bytes;
    if (!ours || h.magic != kMagic || !SameLabel(h, label) || h.seq != me.seq ||
        static_cast<int>(h.kind) != r.kind || h.chunk != r.chunk ||
        h.payload_bytes != r.bytes || truncated || got != want) {
      std::string what;
      if (!ours || h.magic != kMagic) {
        what = "a message that is not a jax_ddl frame";
      } else if (h.seq != me.seq) {
        what = "a frame of a later attempt of this call (attempt " + std::to_string(h.seq) +
               "; this process is at attempt " + std::to_string(me.seq) + ")";
      } else if (static_cast<int>(h.kind) == r.kind && h.chunk != r.chunk) {
        what = "the frame of chunk " + std::to_string(h.chunk) + " where chunk " +
               std::to_string(r.chunk) + " was expected";
      } else {
        what = std::string("a ") + (truncated ? "longer" : "frame of " + std::to_string(got)) +
               " byte" + (truncated ? " frame" : "s") + " where " + std::to_string(want) +
               " were expected";
      }
      failure->message = "process " + std::to_string(r.process) + " sent " + what +
                         " during the " + stage;
      r.done = true;
      --left;
      return -1;
    }
    r.done = true;
    --left;
    ++completed;
    if (r.process >= static_cast<int64_t>(received.size())) received.resize(r.process + 1, 0);
    ++received[r.process];
    post_next(r);
  }
  return completed;
}

bool MpiCall::Impl::GiveUp(const char* stage, Failure* failure) {
  if (watch && watch(failure)) return true;
  if (Clock::now() <= deadline) return false;
  std::vector<int64_t> missing;
  for (const Recv& r : recvs) {
    if (!r.done) missing.push_back(r.process);
  }
  std::sort(missing.begin(), missing.end());
  missing.erase(std::unique(missing.begin(), missing.end()), missing.end());
  failure->deadline = true;
  if (missing.empty()) {
    failure->message = std::string("the ") + stage +
                       " did not complete before the deadline (messages to other "
                       "processes were not taken up)";
    return true;
  }
  // Processes nothing came from, and processes that took part in this call (its handshake,
  // or some of its frames), then stopped.
  std::vector<int64_t> never, stopped;
  int64_t frames = 0;
  bool handshake = false;
  for (int64_t q : missing) {
    const int64_t got = q < static_cast<int64_t>(received.size()) ? received[q] : 0;
    const bool shook = q < static_cast<int64_t>(met.size()) && met[q];
    (got > 0 || shook ? stopped : never).push_back(q);
    frames += got;
    handshake = handshake || shook;
  }
  std::string msg;
  if (!never.empty()) {
    msg = "processes " + Join(never) + " (" + RanksOf(never) + ") never arrived at the " +
          stage + " (data from them did not come before the deadline)";
  }
  if (!stopped.empty()) {
    msg += std::string(msg.empty() ? "" : "; ") + "processes " + Join(stopped) + " (" +
           RanksOf(stopped) + ") stopped sending during the " + stage + " (" +
           (handshake ? "this call's handshake with them passed; " : "") +
           std::to_string(frames) + " of their frames came, then none before the deadline)";
  }
  failure->message = msg;
  return true;
}

bool MpiCall::Wait(const char* stage, Failure* failure) {
  Impl& m = *impl_;
  WireHeader me;
  me.seq = seq_;
  auto pause = std::chrono::microseconds(5);
  for (;;) {
    const int completed = m.Sweep(slot_, stage, me, failure);
    if (completed < 0) return false;
    if (m.left == 0) break;
    if (m.GiveUp(stage, failure)) return false;
    if (completed > 0) {
      pause = std::chrono::microseconds(5);
    } else {
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(200));
    }
  }
  m.Clear();
  return true;
}

int MpiCall::Progress(const char* stage, Failure* failure) {
  Impl& m = *impl_;
  WireHeader me;
  me.seq = seq_;
  const int completed = m.Sweep(slot_, stage, me, failure);
  if (completed < 0) return -1;
  if (m.left == 0) {
    m.Clear();
  } else if (m.GiveUp(stage, failure)) {
    return -1;
  }
  return completed > 0 ? 1 : 0;
}

bool MpiCall::Pending(int64_t chunk) const {
  const Impl& m = *impl_;
  for (const Impl::Send& snd : m.sends) {
    if (snd.chunk == chunk && snd.req != MPI_REQUEST_NULL) return true;
  }
  for (const Impl::Recv& r : m.recvs) {
    if (r.chunk == chunk && !r.done) return true;
  }
  return false;
}

bool MpiCall::Handshake(WireHeader mine, DescribeFn describe, Failure* failure) {
  Impl& m = *impl_;
  mine.magic = kMagic;
  mine.kind = kHandshake;
  mine.module_hash = m.label.module_hash;
  mine.site = m.label.site;
  mine.copy = m.label.copy;
  mine.seq = seq_;
  mine.payload_bytes = 0;
  const int64_t me = g_layout.process;
  MPI_Comm comm = g_comms[slot_];
  const int tag = Tag(m.site_tag, kHandshake, slot_);
  failure->deadline = false;

  // Processes seen at another call, for the message if this one times out.
  std::vector<std::string> elsewhere;
  auto name_of = [](const WireHeader& h) {
    return "call " + std::to_string(h.site) + " of " +
           std::string(h.module_name, strnlen(h.module_name, sizeof(h.module_name)));
  };
  // What to do with a header from `q`: 1 = it is this call's, 0 = not this call's (a late
  // one is dropped, another call's kept for that call; keep waiting), -1 = this call
  // cannot succeed (*failure says why).
  auto classify = [&](const WireHeader& h, int64_t q) -> int {
    const std::string who = "process " + std::to_string(q);
    if (h.magic != kMagic) {
      failure->message = who + " sent a message that is not a jax_ddl handshake";
      return -1;
    }
    if (!SameLabel(h, m.label)) {
      Stash(slot_, q, m.site_tag, h);
      elsewhere.push_back(who + " sent the handshake of " + name_of(h));
      return 0;
    }
    if (h.seq > seq_) {
      Stash(slot_, q, m.site_tag, h);  // for the attempt it belongs to
      failure->message = who + " has already given up on " + describe(mine) +
                         " (it is at attempt " + std::to_string(h.seq) +
                         " of this call site, this process at attempt " +
                         std::to_string(seq_) + "), after a timeout or a failure there";
      return -1;
    }
    if (h.seq < seq_) {
      GetCounters().stale_messages.fetch_add(1, std::memory_order_relaxed);
      return 0;
    }
    const std::string why = Disagreement(mine, h, q, describe);
    if (!why.empty()) {
      failure->message = why;
      return -1;
    }
    // A process that gave up on this call has sent its next attempt's header behind
    // this one: then this call cannot complete there.
    for (;;) {
      int flag = 0;
      MPI_Status st;
      g_api.iprobe(static_cast<int>(q), tag, comm, &flag, &st);
      if (!flag) return 1;
      int bytes = 0;
      g_api.get_count(&st, MPI_BYTE, &bytes);
      if (bytes != static_cast<int>(kFrameHeader)) {
        failure->message = who + " sent a handshake of " + std::to_string(bytes) +
                           " bytes where " + std::to_string(kFrameHeader) + " were expected";
        return -1;
      }
      WireHeader next;
      std::vector<char> buf(kFrameHeader);
      if (g_api.recv(buf.data(), static_cast<int>(kFrameHeader), MPI_BYTE, static_cast<int>(q),
                     tag, comm, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
        failure->message = "MPI error receiving a handshake from " + who;
        return -1;
      }
      std::memcpy(&next, buf.data(), sizeof(next));
      if (next.magic == kMagic && (!SameLabel(next, m.label) || next.seq > seq_)) {
        Stash(slot_, q, m.site_tag, next);  // another call's, or a later attempt's
        if (SameLabel(next, m.label)) {
          failure->message = who + " gave up on " + describe(mine) + " while answering it";
          return -1;
        }
        continue;
      }
      GetCounters().stale_messages.fetch_add(1, std::memory_order_relaxed);
    }
  };

  // Post a receive for every peer without a stashed header, and send ours to all.
  std::vector<int64_t> peers;
  for (int64_t q = 0; q < g_layout.processes; ++q) {
    if (q != me) peers.push_back(q);
  }
  std::vector<int> state(peers.size(), 0);  // 0 waiting, 1 matched
  std::vector<Impl::Recv> recvs;
  recvs.reserve(peers.size());
  for (size_t i = 0; i < peers.size(); ++i) {
    m.own.emplace_back(kFrameHeader);
    recvs.push_back(Impl::Recv{peers[i], slot_, kHandshake, m.own.back().data(), 0});
  }
  for (size_t i = 0; i < peers.size(); ++i) {
    WireHeader stashed;
    int verdict = 0;
    if (Unstash(slot_, peers[i], m.site_tag, m.label, seq_, &stashed)) {
      verdict = classify(stashed, peers[i]);
    }
    if (verdict < 0) return false;
    if (verdict == 1) {
      state[i] = 1;
      recvs[i].done = true;
    } else {
      m.Post(recvs[i], slot_);
    }
  }
  for (int64_t q : peers) {
    m.own.emplace_back(kFrameHeader);
    std::memcpy(m.own.back().data(), &mine, sizeof(mine));
    MPI_Request r;
    const int rc = g_api.isend(m.own.back().data(), static_cast<int>(kFrameHeader), MPI_BYTE,
                               static_cast<int>(q), tag, comm, &r);
    if (rc != MPI_SUCCESS) {
      failure->message = "MPI error sending the handshake to process " + std::to_string(q) +
                         ": " + MpiErrorText(rc);
      Poison(failure->message);
      for (auto& r2 : recvs) {
        if (!r2.done) {
          m.recvs.push_back(r2);
          ++m.left;
        }
      }
      return false;
    }
    m.sends.push_back(Impl::Send{r, q, -1});  // no chunk's: Pending(0) does not wait on it
    ++m.left;
  }
  // Receives stay in `recvs` until matched; unmatched ones move to the call's list on
  // failure, so Abandon cancels them.
  auto give_up = [&]() {
    for (auto& r : recvs) {
      if (!r.done && r.req != MPI_REQUEST_NULL) {
        m.recvs.push_back(r);
        ++m.left;
      }
    }
    return false;
  };
  if (!m.post_error.empty()) {
    failure->message = m.post_error;
    return give_up();
  }
  size_t left = std::count(state.begin(), state.end(), 0);
  auto pause = std::chrono::microseconds(5);
  const auto waiting_since = Clock::now();
  while (left > 0) {
    bool progressed = false;
    for (size_t i = 0; i < peers.size(); ++i) {
      if (state[i]) continue;
      int flag = 0;
      MPI_Status status;
      const int rc = g_api.test(&recvs[i].req, &flag, &status);
      if (rc != MPI_SUCCESS) {
        int cls = 0;
        g_api.error_class(rc, &cls);
        recvs[i].req = MPI_REQUEST_NULL;
        recvs[i].done = true;
        if (cls == MPI_ERR_TRUNCATE) {
          failure->message = "process " + std::to_string(peers[i]) +
                             " sent a handshake longer than the " +
                             std::to_string(kFrameHeader) + " bytes expected";
          return give_up();
        }
        failure->message = "MPI error during the cross-process handshake with process " +
                           std::to_string(peers[i]) + ": " + MpiErrorText(rc);
        Poison(failure->message);
        return give_up();
      }
      if (!flag) continue;
      progressed = true;
      recvs[i].req = MPI_REQUEST_NULL;
      int bytes = 0;
      g_api.get_count(&status, MPI_BYTE, &bytes);
      if (bytes != static_cast<int>(kFrameHeader)) {
        recvs[i].done = true;
        failure->message = "process " + std::to_string(peers[i]) + " sent a handshake of " +
                           std::to_string(bytes) + " bytes where " +
                           std::to_string(kFrameHeader) + " were expected";
        return give_up();
      }
      WireHeader h;
      std::memcpy(&h, recvs[i].frame, sizeof(h));
      const int verdict = classify(h, peers[i]);
      if (verdict < 0) {
        recvs[i].done = true;
        return give_up();
      }
      if (verdict == 0) {
        m.Post(recvs[i], slot_);
        continue;
      }
      state[i] = 1;
      recvs[i].done = true;
      --left;
      if (peers[i] >= static_cast<int64_t>(m.met.size())) m.met.resize(peers[i] + 1, 0);
      m.met[peers[i]] = 1;
    }
    if (left == 0) break;
    if (m.watch && m.watch(failure)) return give_up();
    if (Clock::now() > m.deadline) {
      std::vector<int64_t> missing;
      for (size_t i = 0; i < peers.size(); ++i) {
        if (!state[i]) missing.push_back(peers[i]);
      }
      failure->deadline = true;
      failure->message = "processes " + Join(missing) + " (" + RanksOf(missing) +
                         ") never arrived at the cross-process handshake of " + describe(mine);
      if (!elsewhere.empty()) {
        failure->message += " (" + elsewhere.back() +
                            " meanwhile: every process must run the same programs in the "
                            "same order)";
      }
      return give_up();
    }
    if (progressed) {
      pause = std::chrono::microseconds(5);
    } else {
      // Backs off to 200 us, and further (to a tenth of the time waited so far, at most
      // 2 ms) while the peers are late: a peer that is 20 ms behind is still computing,
      // and with gradient buckets a process has many calls waiting at once, each polling
      // on its own thread (measured: their polls cost more CPU than the messages).
      std::this_thread::sleep_for(pause);
      const auto waited =
          std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - waiting_since);
      const auto cap = std::clamp(waited / 10, std::chrono::microseconds(200),
                                  std::chrono::microseconds(2000));
      pause = std::min(pause * 2, cap);
    }
  }
  return true;
}

bool MpiCall::Done(const std::vector<std::pair<int64_t, int64_t>>& peers, Failure* failure) {
  Impl& m = *impl_;
  for (const auto& [process, slot] : peers) {
    m.own.emplace_back(kFrameHeader);
    PostRecv(process, slot, kDone, m.own.back().data(), 0);
    m.own.emplace_back(kFrameHeader);
    PostSend(process, slot, kDone, m.own.back().data(), 0);
  }
  return Wait("cross-process completion", failure);
}

void MpiCall::Abandon(std::vector<std::vector<char>>* buffers) {
  Impl& m = *impl_;
  std::vector<MPI_Request> pending;
  for (Impl::Recv& r : m.recvs) {
    if (r.done || r.req == MPI_REQUEST_NULL) continue;
    g_api.cancel(&r.req);
    pending.push_back(r.req);
  }
  for (const Impl::Send& snd : m.sends) {
    if (snd.req != MPI_REQUEST_NULL) pending.push_back(snd.req);
  }
  m.Clear();
  // Cancelled receives and sends already taken up finish at once; give them a moment.
  const auto until = Clock::now() + std::chrono::milliseconds(20);
  for (;;) {
    bool all = true;
    for (MPI_Request& r : pending) {
      if (r == MPI_REQUEST_NULL) continue;
      int flag = 0;
      g_api.test(&r, &flag, MPI_STATUS_IGNORE);
      if (flag) r = MPI_REQUEST_NULL;
      else all = false;
    }
    if (all || Clock::now() > until) break;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  pending.erase(std::remove(pending.begin(), pending.end(), MPI_REQUEST_NULL), pending.end());
  if (pending.empty()) return;
  auto grave = std::make_unique<Grave>();
  grave->reqs = std::move(pending);
  grave->frames = std::move(m.own);
  m.own.clear();
  if (buffers != nullptr) {
    grave->buffers = std::move(*buffers);
    buffers->clear();
  }
  g_abandoned.fetch_add(static_cast<int64_t>(grave->reqs.size()));
  std::lock_guard<std::mutex> lock(g_grave_mu);
  g_graves.push_back(std::move(grave));
}

#else  // no MPI in this build: every call fails at once

struct MpiCall::Impl {};
void MpiCall::Watch(std::function<bool(Failure*)>) {}
void MpiCall::SetDeadline(Clock::time_point) {}
MpiCall::MpiCall(int64_t slot, const CallLabel&, Clock::time_point)
    : impl_(new Impl()), slot_(slot) {}
MpiCall::~MpiCall() { delete impl_; }
bool MpiCall::ok(Failure* failure) const {
  failure->message = "this build of jax_ddl has no MPI transport";
  return false;
}
bool MpiCall::Handshake(WireHeader, DescribeFn, Failure* failure) { return ok(failure); }
void MpiCall::PostSend(int64_t, int64_t, int, char*, int64_t, int64_t) {}
void MpiCall::PostRecv(int64_t, int64_t, int, char*, int64_t, int64_t) {}
bool MpiCall::Wait(const char*, Failure* failure) { return ok(failure); }
int MpiCall::Progress(const char*, Failure* failure) { return ok(failure) ? 0 : -1; }
bool MpiCall::Pending(int64_t) const { return false; }
bool MpiCall::Done(const std::vector<std::pair<int64_t, int64_t>>&, Failure* failure) {
  return ok(failure);
}
void MpiCall::Abandon(std::vector<std::vector<char>>*) {}

#endif

}  // namespace jax_ddl
