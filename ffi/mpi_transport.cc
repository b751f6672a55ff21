// MPI transport (see mpi_transport.h). Point-to-point messages with deadlines: blocking
// collectives cannot time out, and a peer that never arrives must make this call fail
// with its rank named, not hang. Reductions are ours (plan order), MPI only moves bytes.
#include "mpi_transport.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if JAX_DDL_HAVE_MPI
#include <mpi.h>
#endif

namespace jax_ddl {
namespace {

ProcessLayout g_layout;
bool g_attached = false;

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

#if JAX_DDL_HAVE_MPI
struct Api {
  decltype(&MPI_Isend) isend;
  decltype(&MPI_Irecv) irecv;
  decltype(&MPI_Test) test;
  decltype(&MPI_Cancel) cancel;
  decltype(&MPI_Request_free) request_free;
  decltype(&MPI_Query_thread) query_thread;
  decltype(&MPI_Get_library_version) library_version;
};
Api g_api;
std::vector<MPI_Comm> g_comms;

template <typename F>
bool Bind(void* lib, const char* name, F* fn, std::string* error) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  if (*fn == nullptr) *error = std::string("the MPI library has no ") + name;
  return *fn != nullptr;
}

constexpr int kHeaderTag = 7100;
constexpr int kDataTag = 7200;   // + stage (reduce-scatter) or + 100 + stage (all-gather)
constexpr int kDoneTag = 7500;   // all messages of a call are through
constexpr int kPairTag = 10000;  // + sending slot: streams between device threads
constexpr int64_t kMaxSlots = 20000;  // kPairTag + slot stays below MPI's minimum tag bound

// The calling thread's outstanding requests, with the peer process each belongs to.
struct Exchange {
  std::vector<MPI_Request> reqs;
  std::vector<int64_t> peer;  // process rank per request
  std::vector<bool> is_recv;
  std::vector<bool> done;
  std::string error;  // the first failure to post, reported by Wait

  void Add(int rc, MPI_Request r, int64_t p, bool recv, const char* what) {
    if (rc != MPI_SUCCESS) {
      if (error.empty()) {
        error = std::string("MPI error ") + std::to_string(rc) + " posting a " + what +
                " with process " + std::to_string(p);
      }
      return;
    }
    reqs.push_back(r);
    peer.push_back(p);
    is_recv.push_back(recv);
  }

  void Fail(const std::string& why) {
    if (error.empty()) error = why;
  }

  // Waits for every request until `deadline`, polling (a blocking wait cannot time out).
  // On expiry cancels what is left and names the processes whose messages never came.
  bool Wait(Clock::time_point deadline, const char* stage, Failure* failure) {
    done.assign(reqs.size(), false);
    if (!error.empty()) {
      failure->deadline = false;
      failure->message = error + " (" + stage + ")";
      Abandon();
      return false;
    }
    size_t left = reqs.size();
    auto pause = std::chrono::microseconds(5);
    while (left > 0) {
      bool progressed = false;
      for (size_t i = 0; i < reqs.size(); ++i) {
        if (done[i]) continue;
        int flag = 0;
        int rc = g_api.test(&reqs[i], &flag, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
          failure->deadline = false;
          failure->message = std::string("MPI error ") + std::to_string(rc) + " during the " +
                             stage + " with process " + std::to_string(peer[i]);
          Abandon();
          return false;
        }
        if (flag) {
          done[i] = true;
          --left;
          progressed = true;
        }
      }
      if (left == 0) break;
      if (Clock::now() > deadline) {
        std::vector<int64_t> missing;
        for (size_t i = 0; i < reqs.size(); ++i) {
          if (!done[i] && is_recv[i]) missing.push_back(peer[i]);
        }
        std::sort(missing.begin(), missing.end());
        missing.erase(std::unique(missing.begin(), missing.end()), missing.end());
        failure->deadline = true;
        failure->message = "processes " + Join(missing) + " (" + RanksOf(missing) +
                           ") never arrived at the " + stage +
                           " (data from them did not come before the deadline)";
        Abandon();
        return false;
      }
      if (progressed) {
        pause = std::chrono::microseconds(5);
      } else {
        std::this_thread::sleep_for(pause);
        pause = std::min(pause * 2, std::chrono::microseconds(200));
      }
    }
    reqs.clear();
    peer.clear();
    is_recv.clear();
    return true;
  }

  void Abandon() {
    for (size_t i = 0; i < reqs.size(); ++i) {
      if ((i < done.size() && done[i]) || reqs[i] == MPI_REQUEST_NULL) continue;
      if (is_recv[i]) g_api.cancel(&reqs[i]);
      g_api.request_free(&reqs[i]);
    }
    reqs.clear();
    peer.clear();
    is_recv.clear();
    error.clear();
  }
};

// Per device thread and kept across calls: no allocation once warm.
thread_local Exchange t_ex;

bool CheckBytes(int64_t bytes, Failure* failure) {
  if (bytes <= INT_MAX) return true;
  failure->message = "a message of " + std::to_string(bytes) +
                     " bytes exceeds MPI's int count; reduce fewer bytes per call";
  return false;
}
#endif

}  // namespace

bool MpiCompiledIn() { return JAX_DDL_HAVE_MPI != 0; }
bool MpiAttached() { return g_attached; }
const ProcessLayout& MpiLayout() { return g_layout; }

bool MpiAttach(const std::vector<int64_t>& comm_handles, int64_t process, int64_t processes,
               std::string* error) {
#if JAX_DDL_HAVE_MPI
  void* lib = dlopen("libmpi.so.12", RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
  if (lib == nullptr) {
    *error = "no MPICH-ABI MPI library (libmpi.so.12) is loaded in this process; import "
             "mpi4py.MPI (from the mpi extra: mpi4py and mpich) before attaching";
    return false;
  }
  Api api{};
  if (!Bind(lib, "MPI_Isend", &api.isend, error) || !Bind(lib, "MPI_Irecv", &api.irecv, error) ||
      !Bind(lib, "MPI_Test", &api.test, error) || !Bind(lib, "MPI_Cancel", &api.cancel, error) ||
      !Bind(lib, "MPI_Request_free", &api.request_free, error) ||
      !Bind(lib, "MPI_Query_thread", &api.query_thread, error) ||
      !Bind(lib, "MPI_Get_library_version", &api.library_version, error)) {
    return false;
  }
  int provided = 0;
  api.query_thread(&provided);
  if (provided != MPI_THREAD_MULTIPLE) {
    *error = "MPI was initialised without MPI_THREAD_MULTIPLE (level " +
             std::to_string(provided) + "); jax_ddl's device threads call it concurrently";
    return false;
  }
  if (static_cast<int64_t>(comm_handles.size()) > kMaxSlots) {
    *error = "at most " + std::to_string(kMaxSlots) + " local devices per process can attach";
    return false;
  }
  g_comms.clear();
  for (int64_t h : comm_handles) g_comms.push_back(static_cast<MPI_Comm>(h));
  g_api = api;
  g_layout = ProcessLayout{process, processes, static_cast<int64_t>(comm_handles.size())};
  g_attached = true;
  return true;
#else
  *error = "this build of jax_ddl has no MPI transport (no MPI headers were found when it "
           "was built); reinstall with the mpich package present";
  return false;
#endif
}

bool MpiHandshake(int64_t slot, const std::vector<int64_t>& processes,
                  const ProcessHeader& header, DescribeFn describe, Clock::time_point deadline,
                  Failure* failure) {
#if JAX_DDL_HAVE_MPI
  if (!g_attached || slot < 0 || slot >= static_cast<int64_t>(g_comms.size())) {
    failure->message = "no MPI communicator for local slot " + std::to_string(slot);
    return false;
  }
  MPI_Comm comm = g_comms[slot];
  thread_local std::vector<ProcessHeader> theirs;
  theirs.assign(processes.size(), ProcessHeader{});
  for (size_t i = 0; i < processes.size(); ++i) {
    const int p = static_cast<int>(processes[i]);
    MPI_Request r;
    int rc = g_api.irecv(&theirs[i], sizeof(ProcessHeader), MPI_BYTE, p, kHeaderTag, comm, &r);
    t_ex.Add(rc, r, p, true, "header receive");
    rc = g_api.isend(&header, sizeof(ProcessHeader), MPI_BYTE, p, kHeaderTag, comm, &r);
    t_ex.Add(rc, r, p, false, "header send");
  }
  if (!t_ex.Wait(deadline, "cross-process handshake", failure)) return false;
  for (size_t i = 0; i < processes.size(); ++i) {
    if (!(theirs[i] == header)) {
      failure->deadline = false;
      failure->message = "processes disagree on the call: this process has " +
                         describe(header) + ", process " + std::to_string(processes[i]) +
                         " has " + describe(theirs[i]) +
                         "; every process must run the same program on the same shapes";
      return false;
    }
  }
  return true;
#else
  failure->message = "this build of jax_ddl has no MPI transport";
  return false;
#endif
}

#if JAX_DDL_HAVE_MPI
namespace {
// One message of a pair stream: to (process, slot) on that slot's communicator, or from
// it on ours; the tag is the sending slot.
void Post(bool send, int64_t my_slot, int64_t process, int64_t slot, char* data,
          int64_t bytes) {
  if (bytes > INT_MAX) {
    t_ex.Fail("a message of " + std::to_string(bytes) +
              " bytes exceeds MPI's int count; reduce fewer bytes per call");
    return;
  }
  MPI_Request r;
  const int peer = static_cast<int>(process);
  const int count = static_cast<int>(bytes);
  const int tag = kPairTag + static_cast<int>(send ? my_slot : slot);
  const int rc = send ? g_api.isend(data, count, MPI_BYTE, peer, tag, g_comms[slot], &r)
                      : g_api.irecv(data, count, MPI_BYTE, peer, tag, g_comms[my_slot], &r);
  t_ex.Add(rc, r, process, !send, send ? "send" : "receive");
}
}  // namespace
#endif

void MpiPostSend(int64_t my_slot, int64_t process, int64_t slot, const char* data,
                 int64_t bytes) {
#if JAX_DDL_HAVE_MPI
  Post(true, my_slot, process, slot, const_cast<char*>(data), bytes);  // MPI only reads it
#else
  (void)my_slot, (void)process, (void)slot, (void)data, (void)bytes;
#endif
}

void MpiPostRecv(int64_t my_slot, int64_t process, int64_t slot, char* data, int64_t bytes) {
#if JAX_DDL_HAVE_MPI
  Post(false, my_slot, process, slot, data, bytes);
#else
  (void)my_slot, (void)process, (void)slot, (void)data, (void)bytes;
#endif
}

bool MpiWait(Clock::time_point deadline, const char* stage, Failure* failure) {
#if JAX_DDL_HAVE_MPI
  return t_ex.Wait(deadline, stage, failure);
#else
  (void)deadline, (void)stage;
  failure->message = "this build of jax_ddl has no MPI transport";
  return false;
#endif
}

bool MpiAllreduce(int64_t slot, char* data, int64_t n, int64_t elem, int op, ReduceFn reduce,
                  const Plan& plan, const ProcessHeader& header, DescribeFn describe,
                  Clock::time_point deadline, std::vector<char>* scratch, Failure* failure) {
#if JAX_DDL_HAVE_MPI
  if (!g_attached || slot < 0 || slot >= static_cast<int64_t>(g_comms.size())) {
    failure->message = "no MPI communicator for local slot " + std::to_string(slot);
    return false;
  }
  MPI_Comm comm = g_comms[slot];
  const int64_t me = g_layout.process;
  Exchange& ex = t_ex;
  thread_local std::vector<int64_t> peers;
  thread_local std::vector<const char*> srcs;

  // Headers first: every peer of every stage must be running the same call.
  peers.clear();
  for (int s = 0; s < plan.num_stages(); ++s) {
    for (int64_t g = 0; g < plan.dim(s); ++g) {
      const int64_t q = plan.Peer(me, s, g);
      if (q != me) peers.push_back(q);
    }
  }
  if (!MpiHandshake(slot, peers, header, describe, deadline, failure)) return false;

  // Reduce-scatter, stage by stage: receive every group peer's copy of the slice this
  // process owns next, reduce the copies in group order.
  const int stages = plan.num_stages();
  for (int s = 0; s < stages; ++s) {
    const int64_t k = plan.dim(s);
    if (k == 1) continue;
    const Range mine = plan.Region(me, s + 1, n);
    if (!CheckBytes(plan.Region(me, s, n).size() * elem, failure)) return false;
    scratch->resize(std::max<size_t>(scratch->size(), (k - 1) * mine.size() * elem + 1));
    int64_t slot_i = 0;
    for (int64_t g = 0; g < k; ++g) {
      const int64_t q = plan.Peer(me, s, g);
      if (q == me) continue;
      const Range theirs_r = plan.Region(q, s + 1, n);
      MPI_Request r;
      int rc = g_api.irecv(scratch->data() + slot_i * mine.size() * elem,
                           static_cast<int>(mine.size() * elem), MPI_BYTE, static_cast<int>(q),
                           kDataTag + s, comm, &r);
      ex.Add(rc, r, q, true, "receive");
      rc = g_api.isend(data + theirs_r.begin * elem, static_cast<int>(theirs_r.size() * elem),
                       MPI_BYTE, static_cast<int>(q), kDataTag + s, comm, &r);
      ex.Add(rc, r, q, false, "send");
      ++slot_i;
    }
    if (!ex.Wait(deadline, "cross-process reduce-scatter", failure)) return false;
    srcs.clear();
    slot_i = 0;
    for (int64_t g = 0; g < k; ++g) {
      const int64_t q = plan.Peer(me, s, g);
      if (q == me) {
        srcs.push_back(data + mine.begin * elem);
      } else {
        srcs.push_back(scratch->data() + slot_i * mine.size() * elem);
        ++slot_i;
      }
    }
    reduce(op, srcs.data(), k, data + mine.begin * elem, mine.size());
  }
  // All-gather in reverse: send the slice owned after stage s to every group peer and
  // receive theirs in place.
  for (int s = stages - 1; s >= 0; --s) {
    const int64_t k = plan.dim(s);
    if (k == 1) continue;
    const Range mine = plan.Region(me, s + 1, n);
    for (int64_t g = 0; g < k; ++g) {
      const int64_t q = plan.Peer(me, s, g);
      if (q == me) continue;
      const Range theirs_r = plan.Region(q, s + 1, n);
      MPI_Request r;
      int rc = g_api.irecv(data + theirs_r.begin * elem, static_cast<int>(theirs_r.size() * elem),
                           MPI_BYTE, static_cast<int>(q), kDataTag + 100 + s, comm, &r);
      ex.Add(rc, r, q, true, "receive");
      rc = g_api.isend(data + mine.begin * elem, static_cast<int>(mine.size() * elem), MPI_BYTE,
                       static_cast<int>(q), kDataTag + 100 + s, comm, &r);
      ex.Add(rc, r, q, false, "send");
    }
    if (!ex.Wait(deadline, "cross-process all-gather", failure)) return false;
  }
  // MPI's progress is weak: a send may need its receiver to go on calling MPI after the
  // receive completed. Before leaving, tell every peer all is through and wait for the
  // same word back, so no process leaves while a peer's sends still need it.
  static const char kDone = 1;
  thread_local std::vector<char> words;
  words.assign(peers.size(), 0);
  for (size_t i = 0; i < peers.size(); ++i) {
    MPI_Request r;
    const int q = static_cast<int>(peers[i]);
    int rc = g_api.irecv(&words[i], 1, MPI_BYTE, q, kDoneTag, comm, &r);
    ex.Add(rc, r, q, true, "receive");
    rc = g_api.isend(&kDone, 1, MPI_BYTE, q, kDoneTag, comm, &r);
    ex.Add(rc, r, q, false, "send");
  }
  return ex.Wait(deadline, "cross-process completion", failure);
#else
  (void)slot, (void)data, (void)n, (void)elem, (void)op, (void)reduce, (void)plan,
      (void)header, (void)describe, (void)deadline, (void)scratch;
  failure->message = "this build of jax_ddl has no MPI transport";
  return false;
#endif
}

}  // namespace jax_ddl
