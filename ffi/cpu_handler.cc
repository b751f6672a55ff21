// jax_ddl_allreduce on CPU: DDL's multi-dimensional allreduce over the devices of one
// process through shared memory, and across processes over MPI. Each device thread reads
// its peers' buffers directly, reduces the slice it owns at each stage and writes each
// final slice into every output. The handler returns an FFI future: a call finishes on
// XLA's thread if its peers arrive within a short wait, else on one of jax_ddl's threads
// (executor.h), so XLA's threads never wait long for a peer.
#include "cpu_handler.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "executor.h"
#include "kernels.h"
#include "mpi_transport.h"
#include "prefault.h"
#include "rendezvous.h"
#include "site.h"
#include "topology.h"

namespace ffi = xla::ffi;

namespace jax_ddl {
namespace {

uint64_t Nanos(Clock::time_point a, Clock::time_point b) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count());
}

// Set when a failed call could not make sure its peers had stopped writing into its
// buffers: the process's memory can no longer be trusted, so every later call fails.
std::atomic<bool> g_unsafe{false};

// Where one rank's copy of the (virtual, concatenated) data lives: its buffers, split at
// the shared layout offsets, or one contiguous scratch array.
struct View {
  char* const* segs = nullptr;
  char* flat = nullptr;
  int64_t elem = 0;
  int64_t origin = 0;  // the element `flat` points at (a flat copy of part of the data)
  char* At(const int64_t* offsets, int64_t seg, int64_t e) const {
    return flat ? flat + (e - origin) * elem : segs[seg] + (e - offsets[seg]) * elem;
  }
};

// Calls fn(seg, begin, len) for the pieces of `r` that lie inside one buffer each.
template <typename Fn>
void ForEachPiece(const std::vector<int64_t>& offsets, Range r, Fn&& fn) {
  if (r.size() <= 0) return;
  int64_t seg = std::upper_bound(offsets.begin(), offsets.end(), r.begin) - offsets.begin() - 1;
  int64_t pos = r.begin;
  const int64_t num_segs = static_cast<int64_t>(offsets.size()) - 1;
  while (pos < r.end && seg < num_segs) {
    const int64_t end = std::min(r.end, offsets[seg + 1]);
    if (end > pos) fn(seg, pos, end - pos);
    pos = std::max(pos, end);
    ++seg;
  }
}

// Copies `r` of a view into contiguous memory, and back.
void Gather(const View& v, const std::vector<int64_t>& offsets, Range r, char* dst) {
  ForEachPiece(offsets, r, [&](int64_t seg, int64_t begin, int64_t len) {
    std::memcpy(dst + (begin - r.begin) * v.elem, v.At(offsets.data(), seg, begin), len * v.elem);
  });
}
void Scatter(const char* src, const View& v, const std::vector<int64_t>& offsets, Range r) {
  ForEachPiece(offsets, r, [&](int64_t seg, int64_t begin, int64_t len) {
    std::memcpy(v.At(offsets.data(), seg, begin), src + (begin - r.begin) * v.elem, len * v.elem);
  });
}

// Everything one call needs, gathered by the handler before it hands the call over.
struct Call {
  Site* site;
  DeviceSite* ds;
  int64_t device;
  int64_t rank;
  Op op;
  Descriptor desc;
  RendezvousKey key;
  Clock::time_point start;
  Clock::time_point deadline;
  FaultKind fault = FaultKind::kNone;
  int64_t fault_ms = 0;
  int64_t chunks = 1;  // pipeline chunks across processes
};

// How long a failing rank waits for its peers to stop working on its buffers.
Clock::time_point QuiesceUntil(const Call& c) {
  const int64_t ms = c.site->timeout_ms() < 0 ? -1 : std::max<int64_t>(c.site->timeout_ms(), 30000);
  return Deadline(Clock::now(), ms);
}

// How long a barrier of a call across processes keeps waiting for local ranks that wait
// on other processes (Rendezvous::Barrier): their waits end at the same deadline, and
// then they report which process did not answer; half a second for that verdict.
Clock::time_point AwayUntil(const Call& c) {
  return c.site->timeout_ms() < 0 ? c.deadline : c.deadline + std::chrono::milliseconds(500);
}

template <typename A, typename S, typename D>
void ReduceDispatch(Op op, const char* const* srcs, int64_t n_src, char* const* dsts,
                    int64_t n_dst, int64_t n) {
  switch (op) {
    case Op::kSum: return ReduceKernel<Op::kSum, A, S, D>(srcs, n_src, dsts, n_dst, n);
    case Op::kMax: return ReduceKernel<Op::kMax, A, S, D>(srcs, n_src, dsts, n_dst, n);
    case Op::kMin: return ReduceKernel<Op::kMin, A, S, D>(srcs, n_src, dsts, n_dst, n);
  }
}

template <typename A, typename S>
void AccumulateDispatch(Op op, bool first, const S* src, A* acc, int64_t n) {
  switch (op) {
    case Op::kSum: return Accumulate<Op::kSum, A, S>(first, src, acc, n);
    case Op::kMax: return Accumulate<Op::kMax, A, S>(first, src, acc, n);
    case Op::kMin: return Accumulate<Op::kMin, A, S>(first, src, acc, n);
  }
}

ffi::Error Fail(ffi::ErrorCode code, const std::string& msg) {
  GetCounters().errors.fetch_add(1, std::memory_order_relaxed);
  return ffi::Error(code, msg);
}

ffi::Error FailWith(const Failure& f) {
  return Fail(f.deadline ? ffi::ErrorCode::kDeadlineExceeded : ffi::ErrorCode::kFailedPrecondition,
              f.message);
}

// Leaves `r` after a failure (waiting for the peers to stop touching this rank's buffers)
// and returns the error.
ffi::Error LeaveFailed(const Call& c, Rendezvous* r, int64_t rank, Failure* error, bool own) {
  const bool quiet = own ? Registry::Get().Fail(r, rank, error, QuiesceUntil(c))
                         : Registry::Get().Leave(r, rank, QuiesceUntil(c), error);
  if (!quiet) g_unsafe = true;
  return FailWith(*error);
}

// Joins the call's rendezvous; nullptr (with the error) when it already failed.
Rendezvous* Join(const Call& c, int64_t size, Failure* error) {
  return Registry::Get().Join(c.key, size, c.site->context(), error);
}

void StallIfAsked(const Call& c) {
  if (c.fault == FaultKind::kStall) {
    std::this_thread::sleep_for(std::chrono::milliseconds(c.fault_ms));
  }
}

// Small messages: one barrier. Each rank copies its input into one half of a
// double-buffered staging area, then every rank reduces all of it in plan order. The next
// call at this site writes the other half, and the one after can only start once every
// peer has arrived at the next call, i.e. finished reading: no exit barrier is needed.
// The half flips only after a call succeeded, so a failed call leaves it in step.
template <typename T>
Member PrepareSmall(const Call& c) {
  DeviceSite& ds = *c.ds;
  const int64_t count = c.desc.count;
  std::vector<char>& staging = ds.staging[ds.completed & 1];
  ds.Grow(&staging, count * sizeof(T));
  ForEachPiece(ds.offsets, Range{0, count}, [&](int64_t seg, int64_t begin, int64_t len) {
    std::memcpy(staging.data() + begin * sizeof(T), ds.inputs[seg], len * sizeof(T));
  });
  return Member{c.device, c.desc, ds.inputs.data(), ds.outputs.data(), nullptr, staging.data()};
}

template <typename T>
ffi::Error FinishSmall(const Call& c, Rendezvous* r, bool arrived) {
  using A = typename AccumOf<T>::type;
  DeviceSite& ds = *c.ds;
  const Plan& plan = c.site->plan();
  const int64_t count = c.desc.count;
  const auto& offsets = ds.offsets;
  Failure error;
  if (!arrived && r->AwaitAll(c.rank, c.deadline, c.deadline, &error) != 1) {
    return LeaveFailed(c, r, c.rank, &error, false);
  }
  for (int64_t q = 0; q < plan.num_ranks(); ++q) ds.peer_ptrs[q] = r->member(q).staging;
  // Peers' staging belongs to the call site, not to XLA: it stays valid after they leave.
  Registry::Get().Leave(r, c.rank, c.deadline);
  const auto t1 = Clock::now();
  c.ds->met = t1;

  // Nested accumulation in plan order: level j holds the partial sum over dimension j.
  constexpr int64_t kBlock = 1024;
  const int levels = plan.num_stages();
  ds.Grow(&ds.accum, levels * kBlock * sizeof(A));
  A* acc = reinterpret_cast<A*>(ds.accum.data());
  for (int64_t base = 0; base < count; base += kBlock) {
    const int64_t m = std::min(kBlock, count - base);
    for (int64_t q = 0; q < plan.num_ranks(); ++q) {
      const T* src = reinterpret_cast<const T*>(ds.peer_ptrs[q]) + base;
      AccumulateDispatch<A, T>(c.op, plan.Coord(q, 0) == 0, src, acc, m);
      for (int j = 0; j + 1 < levels && plan.Coord(q, j) == plan.dim(j) - 1; ++j) {
        AccumulateDispatch<A, A>(c.op, plan.Coord(q, j + 1) == 0, acc + j * kBlock,
                                 acc + (j + 1) * kBlock, m);
      }
    }
    const A* result = acc + (levels - 1) * kBlock;
    ForEachPiece(offsets, Range{base, base + m}, [&](int64_t seg, int64_t begin, int64_t len) {
      T* out = reinterpret_cast<T*>(ds.outputs[seg] + (begin - offsets[seg]) * sizeof(T));
      for (int64_t i = 0; i < len; ++i) out[i] = Store<T>(result[begin - base + i]);
    });
  }
  ++ds.completed;
  Counters& k = GetCounters();
  k.small_calls.fetch_add(1, std::memory_order_relaxed);
  k.arrive_ns.fetch_add(Nanos(c.start, t1), std::memory_order_relaxed);
  k.small_ns.fetch_add(Nanos(t1, Clock::now()), std::memory_order_relaxed);
  return ffi::Error::Success();
}

const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    default: return nullptr;
  }
}

std::string DescribeHeader(const WireHeader& h) {
  static const char* kOps[] = {"sum", "max", "min"};
  std::string buffers;
  if (h.num_buffers > 1) {
    char hash[24];
    std::snprintf(hash, sizeof(hash), "%llx", static_cast<unsigned long long>(h.layout_hash));
    buffers = " in " + std::to_string(h.num_buffers) + " buffers (layout " + hash + ")";
  }
  const char* dtype = DtypeName(static_cast<ffi::DataType>(h.dtype));
  std::string call = "call " + std::to_string(h.site);
  if (h.copy > 0) call += " copy " + std::to_string(h.copy);
  return call + " of " + std::string(h.module_name, strnlen(h.module_name, sizeof(h.module_name))) +
         " (" + std::to_string(h.count) + " elements of " + (dtype ? dtype : "?") + buffers +
         ", " + (h.op >= 0 && h.op <= 2 ? kOps[h.op] : "op ?") + ")";
}

// The handshake header: everything the processes must agree on for this call.
WireHeader HeaderOf(const Call& c) {
  const Site& s = *c.site;
  WireHeader h;
  h.count = c.desc.count;
  h.num_buffers = c.desc.num_buffers;
  h.layout_hash = c.desc.layout_hash;
  h.dtype = c.desc.dtype;
  h.op = static_cast<int32_t>(c.op);
  h.mode = static_cast<int32_t>(s.mode());
  h.ndims = static_cast<int32_t>(s.dims().size());
  uint64_t hash = 1469598103934665603ull;
  for (size_t i = 0; i < s.dims().size(); ++i) {
    if (i < static_cast<size_t>(kWireDims)) h.dims[i] = s.dims()[i];
    hash = (hash ^ static_cast<uint64_t>(s.dims()[i])) * 1099511628211ull;
  }
  h.dims_hash = hash;
  h.timeout_ms = s.timeout_ms();
  h.chunks = c.chunks;
  const std::string& name = s.identity().module_name;
  std::memcpy(h.module_name, name.data(), std::min(name.size(), sizeof(h.module_name) - 1));
  return h;
}

CallLabel LabelOf(const Site& s) {
  return CallLabel{s.identity().module_hash, s.identity().site, s.identity().copy};
}

// Payload stride of a frame, so every frame's payload stays 64-byte aligned.
int64_t FrameStride(int64_t payload_bytes) {
  return kFrameHeader + (payload_bytes + 63) / 64 * 64;
}

// The largest slice any member of `me`'s stage-`s` group owns after the stage: the payload
// bound of one frame of that stage (regions differ by at most one element).
int64_t LargestPart(const Plan& plan, int64_t me, int s, int64_t n) {
  int64_t most = 0;
  for (int64_t g = 0; g < plan.dim(s); ++g) {
    most = std::max(most, plan.Region(plan.Peer(me, s, g), s + 1, n).size());
  }
  return most;
}

// Large messages: DDL's schedule. Reduce-scatter stage by stage: at each stage a rank
// reduces the slice it owns from its group's copies. At the last stage the owner of a
// final slice writes it straight into every rank's output: in shared memory that is the
// whole reverse all-gather in one step, each byte written once and never re-read. Only
// the owner ever touches a final slice, in any buffer, so this is safe in place too.
// Every element is reduced in the plan's fixed order: all ranks get identical bits.
template <typename T>
Member PrepareLarge(const Call& c, bool cross) {
  using A = typename AccumOf<T>::type;
  DeviceSite& ds = *c.ds;
  const Plan& plan = cross ? c.site->local_plan() : c.site->plan();
  // 16-bit floats keep intermediate stages in float32 so they are rounded only once.
  const bool scratch = !std::is_same_v<A, T> && plan.num_stages() > 1;
  if (scratch) ds.Grow(&ds.inter, c.desc.count * sizeof(A));
  return Member{c.device, c.desc, ds.inputs.data(), ds.outputs.data(),
                scratch ? ds.inter.data() : nullptr, nullptr};
}

// Where one rank reads its group's copies at each local stage: the inputs at stage 0, the
// previous stage's partial results (in the float32 scratch or in the outputs) after.
template <typename T>
struct LocalViews {
  using A = typename AccumOf<T>::type;
  Rendezvous* r;
  bool scratch;
  View input(int64_t q) const { return View{r->member(q).inputs, nullptr, sizeof(T)}; }
  View output(int64_t q) const { return View{r->member(q).outputs, nullptr, sizeof(T)}; }
  View inter(int64_t q) const {
    return scratch ? View{nullptr, r->member(q).inter, sizeof(A)} : output(q);
  }
  View source(int64_t q, int stage) const { return stage == 0 ? input(q) : inter(q); }
};

// Writes `len` elements from `srcs` (accumulator or T) into every rank's output at
// element `begin` of buffer `seg`, reducing the sources on the way.
template <typename T>
void WriteOutputs(const Call& c, const LocalViews<T>& v, int64_t ranks, int64_t seg, int64_t begin,
                  int64_t len, const char* const* srcs, int64_t n_src, bool src_acc) {
  using A = typename AccumOf<T>::type;
  DeviceSite& ds = *c.ds;
  for (int64_t q = 0; q < ranks; ++q) {
    ds.dst_ptrs[q] = v.output(q).At(ds.offsets.data(), seg, begin);
  }
  if (src_acc) {
    ReduceDispatch<A, A, T>(c.op, srcs, n_src, ds.dst_ptrs.data(), ranks, len);
  } else {
    ReduceDispatch<A, T, T>(c.op, srcs, n_src, ds.dst_ptrs.data(), ranks, len);
  }
}

template <typename T>
ffi::Error FinishLarge(const Call& c, Rendezvous* r, bool arrived) {
  using A = typename AccumOf<T>::type;
  DeviceSite& ds = *c.ds;
  const Plan& plan = c.site->plan();
  const int64_t rank = c.rank;
  const int64_t count = c.desc.count;
  const auto& offsets = ds.offsets;
  const int stages = plan.num_stages();
  const LocalViews<T> v{r, !std::is_same_v<A, T> && stages > 1};
  Failure error;
  if (!arrived && r->AwaitAll(rank, c.deadline, c.deadline, &error) != 1) {
    return LeaveFailed(c, r, rank, &error, false);
  }
  StallIfAsked(c);
  const auto t0 = c.start;
  const auto t1 = Clock::now();
  c.ds->met = t1;
  auto t2 = t1;
  for (int s = 0; s < stages; ++s) {
    const int64_t group_size = plan.dim(s);
    const bool last = s == stages - 1;
    const bool src_acc = s > 0 && v.scratch;
    if (last) t2 = Clock::now();
    ForEachPiece(offsets, plan.Region(rank, s + 1, count),
                 [&](int64_t seg, int64_t begin, int64_t len) {
      for (int64_t g = 0; g < group_size; ++g) {
        ds.peer_ptrs[g] = v.source(plan.Peer(rank, s, g), s).At(offsets.data(), seg, begin);
      }
      if (last) {
        WriteOutputs<T>(c, v, plan.num_ranks(), seg, begin, len, ds.peer_ptrs.data(), group_size,
                        src_acc);
        return;
      }
      char* dst = v.inter(rank).At(offsets.data(), seg, begin);
      if (src_acc) {
        ReduceDispatch<A, A, A>(c.op, ds.peer_ptrs.data(), group_size, &dst, 1, len);
      } else {
        ReduceDispatch<A, T, A>(c.op, ds.peer_ptrs.data(), group_size, &dst, 1, len);
      }
    });
    if (!r->Barrier(rank, s + 1, last ? "exit" : "reduce-scatter", c.deadline, &error)) {
      return LeaveFailed(c, r, rank, &error, false);
    }
  }
  Registry::Get().Leave(r, rank, c.deadline);
  Counters& k = GetCounters();
  k.arrive_ns.fetch_add(Nanos(t0, t1), std::memory_order_relaxed);
  k.reduce_scatter_ns.fetch_add(Nanos(t1, t2), std::memory_order_relaxed);
  k.broadcast_ns.fetch_add(Nanos(t2, Clock::now()), std::memory_order_relaxed);
  return ffi::Error::Success();
}

// A failure of a call across processes: hands the frames MPI may still use to the
// transport, names the local slot when the failure is this rank's own, and leaves.
ffi::Error FailAcross(const Call& c, Rendezvous* r, int64_t slot, MpiCall* mpi, Failure* error,
                      bool own) {
  std::vector<std::vector<char>> frames;
  c.ds->ReleaseMpi(&frames);
  mpi->Abandon(&frames);  // keeps them while MPI may still use them
  own = own && !error->local;
  if (own) {
    error->message =
        c.site->context() + ", local slot " + std::to_string(slot) + ": " + error->message;
  }
  return LeaveFailed(c, r, slot, error, own);
}

// Once the `ranks` local ranks met: all of them keep the latest of their deadlines (each
// counts from the rank's own arrival; Member::deadline) for every later wait, local or on
// other processes, so a rank never passes a barrier after its deadline thanks to a peer
// that waited on other processes until a later one, only to fail its next wait at once.
// MPI waits watch the rendezvous; then the handshake with the same slot of every process,
// the rank paused (it touches only its own buffers meanwhile).
// 0: agreed; 1: the handshake failed; -1: the rendezvous failed meanwhile.
int MeetProcesses(Call* c, Rendezvous* r, int64_t ranks, int64_t slot, MpiCall* mpi,
                  Failure* error) {
  for (int64_t q = 0; q < ranks; ++q) c->deadline = std::max(c->deadline, r->member(q).deadline);
  mpi->SetDeadline(c->deadline);
  mpi->Watch([r](Failure* f) { return r->Failed(f); });
  StallIfAsked(*c);
  r->Pause(slot);
  if (!mpi->Handshake(HeaderOf(*c), &DescribeHeader, error)) return 1;
  return r->Resume(slot, error) ? 0 : -1;
}

// How many pipeline chunks a call across processes is cut into: about chunk_bytes of one
// device's buffer each, at least one element each, at most kMaxChunks, and few enough
// that the local stages' barriers fit one rendezvous (besides arrival, the barrier after
// the handshakes and the exit barrier).
constexpr int64_t kMaxChunks = 64;
int64_t NumChunks(const Site& site, int64_t count, int64_t elem) {
  const int64_t chunk = site.chunk_bytes();
  if (chunk <= 0 || count * elem <= chunk) return 1;
  const int64_t barriers = std::max(1, site.local_plan().num_stages() - 1);
  return std::max<int64_t>(1, std::min({kMaxChunks, count, (count * elem + chunk - 1) / chunk,
                                        (kMaxPhases - 3) / barriers}));
}

// How often a process polls MPI while its calls across processes wait for messages.
// Any thread's poll moves the data of every request of the process (MPI's progress is
// global), but only as much as the sockets hold: measured on 2 emulated hosts with one
// device per process, 16 MiB in place, a thread that backed off to 1 ms between polls took
// 215 ms at 1 Gbit/s (link bound 134) and 194 ms at 10 Gbit/s (MPI_Allreduce 22 ms); polls
// every 100 us: 140 ms and 47 ms. So a thread that sleeps between polls (any slot of any
// call in flight) backs off to kPollEvery times the number of threads sleeping so
// (Sleeping, itself included), between kPollEvery and 1 ms: the process as a whole polls
// about every kPollEvery (each idle poll costs ~5 us of CPU, taken from the work the calls
// overlap), however many calls and slots wait. Threads busy with local work, barriers or
// the completion round are not counted: they would stretch the pauses of the threads
// still waiting for data.
constexpr auto kPollEvery = std::chrono::microseconds(100);
std::atomic<int> g_sleeping{0};
struct Sleeping {
  Sleeping() { g_sleeping.fetch_add(1, std::memory_order_relaxed); }
  ~Sleeping() { g_sleeping.fetch_sub(1, std::memory_order_relaxed); }
  Sleeping(const Sleeping&) = delete;
  Sleeping& operator=(const Sleeping&) = delete;
  int count() const { return g_sleeping.load(std::memory_order_relaxed); }
};
std::chrono::microseconds PollCap(int waiting) {
  return std::clamp(kPollEvery * waiting, kPollEvery, std::chrono::microseconds(1000));
}

// One exchange of the process plan: the reduce-scatter or the all-gather of a stage.
struct Exchange {
  int stage;
  bool gather;
};

// A chunk of a call across processes, and how far it got.
struct Chunk {
  Range range;          // elements of the call
  Range mine;           // this slot's final local slice of them, elements of the call
  char* slice;          // its accumulator copy, which the processes allreduce
  char* rframes;        // frames received by the exchange in flight
  char* sframes;        // frames it sends
  int64_t stride = 0;   // bytes per frame in either
  size_t next = 0;      // the exchange in flight (or next)
  bool ready = false;   // its local stages are done: its slice may be sent
  bool posted = false;  // its first exchange is posted
  bool done = false;    // its results are in every local output
};

// DDL's hierarchy across processes, pipelined. The call is cut into chunks; for each, the
// local stages reduce-scatter it through shared memory (as above) into the slice this
// slot owns, which is then allreduced with the same slot of the other processes over MPI
// (reduce-scatter over the process plan stage by stage, then all-gather back; one
// communicator per slot, so all slots run at once), and finally written into every local
// output. The exchanges of a chunk run while the local stages of the next chunks do, so
// the slow links between hosts carry chunk i while memory works on chunk i + 1; no rank
// blocks on another process while a local peer may wait for it at a barrier. Every element is
// still reduced in the order fixed by the two plans, whatever the chunking: all devices of
// all processes get the same bits, and the same bits as one chunk would give.
template <typename T>
ffi::Error RunAcross(const Call& call) {
  using A = typename AccumOf<T>::type;
  constexpr int64_t ea = sizeof(A);
  Call c = call;
  DeviceSite& ds = *c.ds;
  const Plan& plan = c.site->local_plan();
  const Plan& pplan = c.site->proc_plan();
  const ProcessLayout& pl = MpiLayout();
  const int64_t me = pl.process;
  const int64_t slot = c.rank - me * pl.slots;
  const int64_t count = c.desc.count;
  const int64_t ranks = plan.num_ranks();
  const int stages = plan.num_stages();
  const auto& offsets = ds.offsets;
  c.chunks = NumChunks(*c.site, count, sizeof(T));

  MpiCall mpi(slot, LabelOf(*c.site), c.deadline);
  Failure error;
  if (!mpi.ok(&error)) return FailWith(error);
  Member m = PrepareLarge<T>(c, true);
  m.deadline = c.deadline;

  // The process plan's exchanges, and this slot's scratch, sized before anything is
  // posted: it must not move while MPI may use it.
  std::vector<Exchange> steps;
  for (int s = 0; s < pplan.num_stages(); ++s) {
    if (pplan.dim(s) > 1) steps.push_back({s, false});
  }
  for (int i = static_cast<int>(steps.size()) - 1; i >= 0; --i) {
    steps.push_back({steps[i].stage, true});
  }
  std::vector<std::pair<int64_t, int64_t>> peers;  // (process, slot) this slot talks to
  for (const Exchange& x : steps) {
    for (int64_t g = 0; g < pplan.dim(x.stage); ++g) {
      const std::pair<int64_t, int64_t> p{pplan.Peer(me, x.stage, g), slot};
      if (p.first != me && std::find(peers.begin(), peers.end(), p) == peers.end()) {
        peers.push_back(p);
      }
    }
  }
  std::vector<Chunk> chunks(c.chunks);
  int64_t slice_bytes = 0, frame_bytes = 0;
  std::vector<int64_t> frame_at(c.chunks);
  for (int64_t i = 0; i < c.chunks; ++i) {
    Chunk& k = chunks[i];
    k.range = SplitRange(Range{0, count}, c.chunks, i);
    const Range local = plan.Region(slot, stages, k.range.size());
    k.mine = Range{k.range.begin + local.begin, k.range.begin + local.end};
    for (const Exchange& x : steps) {
      k.stride = std::max(k.stride, FrameStride(LargestPart(pplan, me, x.stage, k.mine.size()) * ea));
    }
    int64_t most = 0;
    for (const Exchange& x : steps) most = std::max(most, pplan.dim(x.stage) - 1);
    frame_at[i] = frame_bytes;
    frame_bytes += most * k.stride;
    slice_bytes += (k.mine.size() * ea + 63) / 64 * 64;
  }
  ds.mpi.resize(3);
  char* slices = ds.Grow(&ds.mpi[0], std::max<int64_t>(1, slice_bytes));
  char* rframes = ds.Grow(&ds.mpi[1], std::max<int64_t>(1, frame_bytes));
  char* sframes = ds.Grow(&ds.mpi[2], std::max<int64_t>(1, frame_bytes));
  for (int64_t i = 0, at = 0; i < c.chunks; ++i) {
    chunks[i].slice = slices + at;
    at += (chunks[i].mine.size() * ea + 63) / 64 * 64;
    chunks[i].rframes = rframes + frame_at[i];
    chunks[i].sframes = sframes + frame_at[i];
  }

  Rendezvous* r = Join(c, ranks, &error);
  if (r == nullptr) return FailWith(error);
  if (!r->Publish(slot, m, &error)) return LeaveFailed(c, r, slot, &error, false);
  if (r->AwaitAll(slot, c.deadline, c.deadline, &error) != 1) {
    return LeaveFailed(c, r, slot, &error, false);
  }
  auto fail = [&](bool own) { return FailAcross(c, r, slot, &mpi, &error, own); };
  if (const int met = MeetProcesses(&c, r, ranks, slot, &mpi, &error); met != 0) {
    return fail(met > 0);
  }
  const auto t1 = Clock::now();
  c.ds->met = t1;
  const LocalViews<T> v{r, m.inter != nullptr};

  auto post = [&](int64_t index) {
    Chunk& k = chunks[index];
    const Exchange x = steps[k.next];
    const int64_t n = k.mine.size();
    const Range own = pplan.Region(me, x.stage + 1, n);
    const int kind = x.gather ? MpiCall::AllGather(x.stage) : MpiCall::ReduceScatter(x.stage);
    for (int64_t g = 0, i = 0; g < pplan.dim(x.stage); ++g) {
      const int64_t q = pplan.Peer(me, x.stage, g);
      if (q == me) continue;
      const Range theirs = pplan.Region(q, x.stage + 1, n);
      const Range in = x.gather ? theirs : own, out = x.gather ? own : theirs;
      mpi.PostRecv(q, slot, kind, k.rframes + i * k.stride, in.size() * ea, index);
      char* frame = k.sframes + i * k.stride;
      std::memcpy(frame + kFrameHeader, k.slice + out.begin * ea, out.size() * ea);
      mpi.PostSend(q, slot, kind, frame, out.size() * ea, index);
      ++i;
    }
  };
  // Reduces (reduce-scatter) or places (all-gather) what the exchange in flight received.
  auto complete = [&](Chunk& k) {
    const Exchange x = steps[k.next];
    const int64_t n = k.mine.size();
    const Range own = pplan.Region(me, x.stage + 1, n);
    thread_local std::vector<const char*> srcs;
    srcs.clear();
    for (int64_t g = 0, i = 0; g < pplan.dim(x.stage); ++g) {
      const int64_t q = pplan.Peer(me, x.stage, g);
      if (q == me) {
        srcs.push_back(k.slice + own.begin * ea);
        continue;
      }
      const char* payload = k.rframes + i++ * k.stride + kFrameHeader;
      srcs.push_back(payload);
      if (x.gather) {
        const Range theirs = pplan.Region(q, x.stage + 1, n);
        std::memcpy(k.slice + theirs.begin * ea, payload, theirs.size() * ea);
      }
    }
    if (!x.gather) {
      char* dst = k.slice + own.begin * ea;
      ReduceDispatch<A, A, A>(c.op, srcs.data(), static_cast<int64_t>(srcs.size()), &dst, 1,
                              own.size());
    }
  };
  // Whether chunk `index` (its local stages done) may post its first exchange: once the
  // chunk before it completed its own. Posted together, the first exchanges of chunks
  // that became ready together (all of them with one device per process, whose local
  // stages are a copy) progress together, so chunk 0 would be done no sooner than the
  // last and the next, slower exchange would wait for all of them: measured on 2 emulated
  // hosts x 4 single-device processes, the link between the hosts started 10 to 30 ms into
  // a 170 ms call. One at a time, chunk 0 reaches it after 1/chunks of that work.
  auto may_start = [&](int64_t index) {
    return index == 0 || steps.empty() ||
           (chunks[index - 1].posted && chunks[index - 1].next > 0);
  };
  // Posts the first exchange of the ready chunks that may start, and moves every posted
  // chunk as far as its messages allow: -1 on a failure, else whether anything moved. A
  // chunk posts an exchange only after the chunk before it did: the messages of one
  // exchange and one pair of processes share a tag, so every process must post them in the
  // same order (MPI matches them in order), whichever chunk's messages arrived first.
  auto advance = [&]() -> int {
    const int rc = mpi.Progress("cross-process exchange", &error);
    if (rc < 0) return -1;
    bool moved = rc > 0;
    for (int64_t i = 0; i < c.chunks; ++i) {
      Chunk& k = chunks[i];
      if (!k.ready || k.done) continue;
      if (!k.posted) {
        if (!may_start(i)) continue;
        if (!steps.empty()) post(i);
        k.posted = true;
        moved = true;
      }
      while (k.next < steps.size() && !mpi.Pending(i) &&
             (i == 0 || chunks[i - 1].next > k.next)) {
        complete(k);
        if (++k.next < steps.size()) post(i);
        moved = true;
      }
      if (k.next < steps.size()) continue;
      ForEachPiece(offsets, k.mine, [&](int64_t seg, int64_t begin, int64_t len) {
        const char* src = k.slice + (begin - k.mine.begin) * ea;
        WriteOutputs<T>(c, v, ranks, seg, begin, len, &src, 1, true);
      });
      k.done = true;
      moved = true;
    }
    return moved ? 1 : 0;
  };

  // No slot sends data before every slot of this process has agreed with its peers. The
  // slots' communicators share one connection per pair of processes, so a slot still in
  // its handshake had its header wait behind the data the others had already sent, began
  // its exchanges late and carried them alone at the end of the call: measured on 2
  // emulated hosts x 1 process of 4 devices at 1 Gbit/s, 16 MiB, a slot met its peer up to
  // 26 ms after the others and the call ended up to 7 ms after the link fell idle.
  int phase = 1;
  if (!r->Barrier(slot, phase++, "handshake", c.deadline, &error, AwayUntil(c))) {
    return fail(false);
  }
  // The local stages of chunk `i` (barriers between them, none after the last), then it
  // may be sent.
  auto local_stages = [&](int64_t i) -> bool {
    Chunk& k = chunks[i];
    for (int s = 0; s < stages; ++s) {
      const int64_t group_size = plan.dim(s);
      const bool last = s == stages - 1;
      const bool src_acc = s > 0 && v.scratch;
      const Range local = plan.Region(slot, s + 1, k.range.size());
      const Range region{k.range.begin + local.begin, k.range.begin + local.end};
      ForEachPiece(offsets, region, [&](int64_t seg, int64_t begin, int64_t len) {
        for (int64_t g = 0; g < group_size; ++g) {
          ds.peer_ptrs[g] = v.source(plan.Peer(slot, s, g), s).At(offsets.data(), seg, begin);
        }
        char* dst = last ? k.slice + (begin - k.mine.begin) * ea
                         : v.inter(slot).At(offsets.data(), seg, begin);
        if (src_acc) {
          ReduceDispatch<A, A, A>(c.op, ds.peer_ptrs.data(), group_size, &dst, 1, len);
        } else {
          ReduceDispatch<A, T, A>(c.op, ds.peer_ptrs.data(), group_size, &dst, 1, len);
        }
      });
      // After the last stage no local peer reads what this rank writes next (its slice, then
      // its final part of every output), so only the earlier stages need a barrier.
      if (!last && !r->Barrier(slot, phase++, "reduce-scatter", c.deadline, &error)) {
        return false;
      }
    }
    k.ready = true;
    return true;
  };
  // With one local stage (no barrier between the local devices) a chunk's local stage runs
  // once the chunk before it is posted, and the thread keeps polling MPI between chunks
  // meanwhile, rather than reducing every chunk first: the processes of a host share the
  // cores, and the work of later chunks delayed the exchanges of the first (measured on 2
  // emulated hosts x 4 single-device processes at 1 Gbit/s, in place: 16 MiB 152.6-153.7
  // vs 154.7-157.4 ms, 64 MiB 584-588 vs 596-601). With several local stages every
  // chunk's local stages run first: a rank waiting at a barrier does not poll, and its
  // peers on other processes could wait for it in turn.
  const bool lazy = stages <= 1;
  int64_t next_local = 0;
  auto t2 = Clock::now();
  // While it waits for messages, this thread makes the outputs it will write present
  // (the final slices of every local output, chunk by chunk; out of place only, in place
  // they are the inputs): measured on 2 emulated hosts x 4 single-device processes at
  // 1 Gbit/s, 64 MiB out of place took 626-642 ms without, 602 ms with. Only once its
  // local stages are done and the first chunk is past its first exchange: before, the
  // page faults took the cores from the work that puts the first bytes on the link
  // (2 emulated hosts x 2 processes x 2 devices, 16 MiB: first bytes 15-35 ms into the
  // call, against 4-7 ms in place; the call 146.1-146.4 ms instead of 151.7-152.8, at
  // 64 MiB 572-582 instead of 598-601). A call of one chunk starts at once (its first
  // exchange is most of it). Listed when it starts, without the chunks already done (their
  // writes took the faults).
  Prefault prefault;
  bool prefault_listed = false;
  auto may_prefault = [&] {
    if (c.chunks > 1 && (next_local < c.chunks || (chunks[0].next == 0 && !chunks[0].done))) {
      return false;
    }
    if (!prefault_listed) {
      prefault_listed = true;
      for (const Chunk& k : chunks) {
        if (k.done) continue;
        for (int64_t q = 0; q < ranks; ++q) {
          ForEachPiece(offsets, k.mine, [&](int64_t seg, int64_t begin, int64_t len) {
            char* out = v.output(q).At(offsets.data(), seg, begin);
            if (out != v.input(q).At(offsets.data(), seg, begin)) {
              prefault.Add(out, len * sizeof(T));
            }
          });
        }
      }
    }
    return true;
  };
  bool prefaulting = true;
  auto pause = std::chrono::microseconds(5);
  for (;;) {
    if (next_local < c.chunks &&
        (!lazy || next_local == 0 || chunks[next_local - 1].posted)) {
      if (!local_stages(next_local)) return fail(false);
      if (++next_local == c.chunks) t2 = Clock::now();
      if (advance() < 0) return fail(true);  // posts it, if the chunk before it is far enough
      pause = std::chrono::microseconds(5);
      continue;
    }
    bool all = true;
    for (const Chunk& k : chunks) all = all && k.done;
    if (all) break;
    const int moved = advance();
    if (moved < 0) return fail(true);
    if (moved == 0 && prefaulting && may_prefault()) {
      prefaulting = prefault.Some(256 << 10);  // about 0.1 ms of page faults
      continue;
    }
    if (moved > 0) {
      pause = std::chrono::microseconds(5);
    } else {
      const Sleeping sleeping;
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, PollCap(sleeping.count()));
    }
  }
  r->Pause(slot);
  if (!mpi.Done(peers, &error)) return fail(true);
  if (!r->Resume(slot, &error)) return fail(false);
  if (!r->Barrier(slot, phase, "exit", c.deadline, &error, AwayUntil(c))) return fail(false);
  Registry::Get().Leave(r, slot, c.deadline);
  Counters& cnt = GetCounters();
  cnt.chunks.fetch_add(c.chunks, std::memory_order_relaxed);
  cnt.arrive_ns.fetch_add(Nanos(c.start, t1), std::memory_order_relaxed);
  cnt.reduce_scatter_ns.fetch_add(Nanos(t1, t2), std::memory_order_relaxed);
  cnt.broadcast_ns.fetch_add(Nanos(t2, Clock::now()), std::memory_order_relaxed);
  return ffi::Error::Success();
}

// A plan whose groups span processes (a flat spec over all devices of all processes, or
// any grid that does not split at a process boundary): every stage of DDL's schedule
// exchanges with its group peers, the local ones through shared memory, the remote ones
// over MPI (a stream per pair of device threads, in frames of this call site's own
// buffers). Reduce-scatter stage by stage: a rank receives the remote copies of the slice
// it owns next and reduces them with the local copies in group order, so every process
// gets the bits one process would. At the last stage the owner writes its final slice
// into the outputs of its local group peers; the all-gather then runs the stages in
// reverse, remote slices over MPI, local ones copied from the peers' outputs.
template <typename T>
ffi::Error RunSpanning(const Call& call) {
  Call c = call;
  using A = typename AccumOf<T>::type;
  constexpr bool kSameAcc = std::is_same_v<A, T>;
  DeviceSite& ds = *c.ds;
  const Plan& plan = c.site->plan();
  const ProcessLayout& pl = MpiLayout();
  const int64_t slots = pl.slots, base = pl.process * slots, me = c.rank;
  const int64_t slot = me - base;
  const int64_t count = c.desc.count;
  const auto& offsets = ds.offsets;
  const int stages = plan.num_stages();
  const bool scratch = !kSameAcc && stages > 1;
  if (scratch) ds.Grow(&ds.inter, count * sizeof(A));
  ds.mpi.resize(3);
  Member m{c.device, c.desc, ds.inputs.data(), ds.outputs.data(),
           scratch ? ds.inter.data() : nullptr, nullptr};
  m.deadline = c.deadline;

  Failure error;
  MpiCall mpi(slot, LabelOf(*c.site), c.deadline);
  if (!mpi.ok(&error)) return FailWith(error);
  const auto t0 = Clock::now();
  Rendezvous* r = Join(c, slots, &error);
  if (r == nullptr) return FailWith(error);
  auto fail = [&](bool own) { return FailAcross(c, r, slot, &mpi, &error, own); };
  if (!r->Arrive(slot, m, c.deadline, &error)) return fail(false);
  if (const int met = MeetProcesses(&c, r, slots, slot, &mpi, &error); met != 0) {
    return fail(met > 0);
  }
  const auto t1 = Clock::now();
  c.ds->met = t1;
  auto local = [&](int64_t q) { return q >= base && q < base + slots; };
  auto input_view = [&](int64_t q) {
    return View{r->member(q - base).inputs, nullptr, sizeof(T)};
  };
  auto output_view = [&](int64_t q) {
    return View{r->member(q - base).outputs, nullptr, sizeof(T)};
  };
  auto inter_view = [&](int64_t q) {
    return scratch ? View{nullptr, r->member(q - base).inter, sizeof(A)} : output_view(q);
  };
  // Waits for this stage's messages without touching any peer's buffers meanwhile.
  ffi::Error result;
  auto wait = [&](const char* stage) {
    r->Pause(slot);
    if (!mpi.Wait(stage, &error)) {
      result = fail(true);
      return false;
    }
    if (!r->Resume(slot, &error)) {
      result = fail(false);
      return false;
    }
    return true;
  };
  std::vector<std::pair<int64_t, int64_t>> remote_peers;

  int phase = 1;
  for (int s = 0; s < stages; ++s) {
    const int64_t k = plan.dim(s);
    const bool last = s == stages - 1;
    const bool src_acc = s > 0 && scratch;
    const int64_t es = src_acc ? sizeof(A) : sizeof(T);
    const Range mine = plan.Region(me, s + 1, count);
    int64_t remote = 0;
    for (int64_t g = 0; g < k; ++g) remote += !local(plan.Peer(me, s, g));
    const int64_t rstride = FrameStride(mine.size() * es);
    const int64_t sstride = FrameStride(LargestPart(plan, me, s, count) * es);
    char* rbuf = ds.Grow(&ds.mpi[1], remote * rstride);
    char* sbuf = ds.Grow(&ds.mpi[2], remote * sstride);
    // Remote copies of my slice arrive in frames; my copies of theirs leave in frames.
    for (int64_t g = 0, i = 0; g < k; ++g) {
      const int64_t q = plan.Peer(me, s, g);
      if (local(q)) continue;
      const std::pair<int64_t, int64_t> peer{q / slots, q % slots};
      if (std::find(remote_peers.begin(), remote_peers.end(), peer) == remote_peers.end()) {
        remote_peers.push_back(peer);
      }
      mpi.PostRecv(q / slots, q % slots, MpiCall::ReduceScatter(s), rbuf + i * rstride,
                   mine.size() * es);
      const Range theirs = plan.Region(q, s + 1, count);
      char* frame = sbuf + i * sstride;
      Gather(s == 0 ? input_view(me) : inter_view(me), offsets, theirs, frame + kFrameHeader);
      mpi.PostSend(q / slots, q % slots, MpiCall::ReduceScatter(s), frame, theirs.size() * es);
      ++i;
    }
    if (remote > 0 && !wait("cross-process reduce-scatter")) return result;
    ForEachPiece(offsets, mine, [&](int64_t seg, int64_t begin, int64_t len) {
      int64_t n_dst = 0;
      for (int64_t g = 0, i = 0; g < k; ++g) {
        const int64_t q = plan.Peer(me, s, g);
        if (local(q)) {
          const View v = s == 0 ? input_view(q) : inter_view(q);
          ds.peer_ptrs[g] = v.At(offsets.data(), seg, begin);
          if (last) ds.dst_ptrs[n_dst++] = output_view(q).At(offsets.data(), seg, begin);
        } else {
          ds.peer_ptrs[g] = rbuf + i * rstride + kFrameHeader + (begin - mine.begin) * es;
          ++i;
        }
      }
      char* inter_dst = last ? nullptr : inter_view(me).At(offsets.data(), seg, begin);
      char** dsts = last ? ds.dst_ptrs.data() : &inter_dst;
      if (!last) n_dst = 1;
      if (last && src_acc) {
        ReduceDispatch<A, A, T>(c.op, ds.peer_ptrs.data(), k, dsts, n_dst, len);
      } else if (last) {
        ReduceDispatch<A, T, T>(c.op, ds.peer_ptrs.data(), k, dsts, n_dst, len);
      } else if (src_acc) {
        ReduceDispatch<A, A, A>(c.op, ds.peer_ptrs.data(), k, dsts, n_dst, len);
      } else {
        ReduceDispatch<A, T, A>(c.op, ds.peer_ptrs.data(), k, dsts, n_dst, len);
      }
    });
    // After the last stage no local peer reads what this rank writes next (the remote
    // slices of its output), so only the earlier stages need a barrier.
    if (!last && !r->Barrier(slot, phase++, "reduce-scatter", c.deadline, &error,
                               AwayUntil(c))) {
      return fail(false);
    }
  }
  const auto t2 = Clock::now();
  for (int s = stages - 1; s >= 0; --s) {
    const int64_t k = plan.dim(s);
    const Range mine = plan.Region(me, s + 1, count);
    int64_t remote = 0;
    for (int64_t g = 0; g < k; ++g) remote += !local(plan.Peer(me, s, g));
    const int64_t rstride = FrameStride(LargestPart(plan, me, s, count) * sizeof(T));
    const int64_t sstride = FrameStride(mine.size() * sizeof(T));
    char* rbuf = ds.Grow(&ds.mpi[1], remote * rstride);
    char* sbuf = ds.Grow(&ds.mpi[2], remote * sstride);
    for (int64_t g = 0, i = 0; g < k; ++g) {
      const int64_t q = plan.Peer(me, s, g);
      if (local(q)) continue;
      mpi.PostRecv(q / slots, q % slots, MpiCall::AllGather(s), rbuf + i * rstride,
                   plan.Region(q, s + 1, count).size() * sizeof(T));
      char* frame = sbuf + i * sstride;
      Gather(output_view(me), offsets, mine, frame + kFrameHeader);
      mpi.PostSend(q / slots, q % slots, MpiCall::AllGather(s), frame, mine.size() * sizeof(T));
      ++i;
    }
    // The last stage's local slices were written by their owners; earlier stages copy
    // them from the local peers' outputs, complete since the previous barrier.
    if (s < stages - 1) {
      for (int64_t g = 0; g < k; ++g) {
        const int64_t q = plan.Peer(me, s, g);
        if (q == me || !local(q)) continue;
        const View from = output_view(q), to = output_view(me);
        ForEachPiece(offsets, plan.Region(q, s + 1, count),
                     [&](int64_t seg, int64_t begin, int64_t len) {
          std::memcpy(to.At(offsets.data(), seg, begin), from.At(offsets.data(), seg, begin),
                      len * sizeof(T));
        });
      }
    }
    if (remote > 0) {
      if (!wait("cross-process all-gather")) return result;
      for (int64_t g = 0, i = 0; g < k; ++g) {
        const int64_t q = plan.Peer(me, s, g);
        if (local(q)) continue;
        Scatter(rbuf + i++ * rstride + kFrameHeader, output_view(me), offsets,
                plan.Region(q, s + 1, count));
      }
    }
    if (s == 0) {
      r->Pause(slot);
      if (!mpi.Done(remote_peers, &error)) return fail(true);
      if (!r->Resume(slot, &error)) return fail(false);
    }
    if (!r->Barrier(slot, phase++, s == 0 ? "exit" : "all-gather", c.deadline, &error,
                    AwayUntil(c))) {
      return fail(false);
    }
  }
  Registry::Get().Leave(r, slot, c.deadline);
  Counters& k = GetCounters();
  k.arrive_ns.fetch_add(Nanos(t0, t1), std::memory_order_relaxed);
  k.reduce_scatter_ns.fetch_add(Nanos(t1, t2), std::memory_order_relaxed);
  k.broadcast_ns.fetch_add(Nanos(t2, Clock::now()), std::memory_order_relaxed);
  return ffi::Error::Success();
}

// Adds this call to the timeline when tracing is on (TraceEnable).
void Trace(const Call& c, bool ok, bool deferred) {
  if (!Tracing()) return;
  TraceEvent e;
  e.site = c.site->context();
  e.rank = c.rank;
  e.device = c.device;
  e.bytes = c.desc.count * static_cast<int64_t>(ffi::ByteWidth(static_cast<ffi::DataType>(
                               c.desc.dtype)));
  e.start_ns = TraceNanos(c.start);
  e.met_ns = c.ds->met == Clock::time_point{} ? 0 : TraceNanos(c.ds->met);
  e.end_ns = TraceNow();
  e.ok = ok;
  e.deferred = deferred;
  TraceRecord(std::move(e));
}

ffi::Future Ready(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  if (error.success()) {
    promise.SetAvailable();
  } else {
    promise.SetError(std::move(error));
  }
  return future;
}

// How long a local call waits on XLA's thread for its peers before handing the wait to
// one of jax_ddl's threads (JAX_DDL_INLINE_WAIT_US, read once; 0: always hand off). Once
// every rank has arrived, every rank holds a thread, so finishing inline cannot starve
// anyone; the bounded wait means a saturated XLA pool is delayed, never deadlocked.
Clock::duration InlineWait() {
  static const Clock::duration wait = [] {
    const char* raw = std::getenv("JAX_DDL_INLINE_WAIT_US");
    char* end = nullptr;
    const long us = raw && *raw ? std::strtol(raw, &end, 10) : 300;
    return std::chrono::microseconds(end && *end ? 300 : std::max(0L, us));
  }();
  return wait;
}

// Runs `fn(c)` on one of jax_ddl's threads; the future completes when it has. `joined`:
// the rendezvous this rank already published in (failed for all if no thread starts).
template <typename Fn>
ffi::Future Defer(const Call& c, Fn fn, Rendezvous* joined = nullptr) {
  ffi::Promise promise;
  ffi::Future future(promise);
  const bool started = RunOnWorker([c, fn, promise]() mutable {
    ffi::Error result = fn(c);
    Trace(c, result.success(), true);
    // The next execution of this site (a loop's next iteration) may start as soon as the
    // promise completes, on this very thread: release the site first.
    c.ds->busy = false;
    if (result.success()) {
      promise.SetAvailable();
    } else {
      promise.SetError(std::move(result));
    }
  });
  if (!started) {
    Failure failure{false, false,
                    c.site->context() + ": could not start a thread for this call (rank " +
                        std::to_string(c.rank) + ")"};
    if (joined != nullptr) Registry::Get().Fail(joined, c.rank, &failure, QuiesceUntil(c));
    c.ds->busy = false;
    promise.SetError(FailWith(failure));
  }
  return future;
}

ffi::Future Done(const Call& c, ffi::Error result) {
  Trace(c, result.success(), false);
  c.ds->busy = false;
  return Ready(std::move(result));
}

// Starts the call: across processes on a worker from the start (MPI waits are long);
// inside the process it publishes its buffers, waits briefly for its peers here and
// finishes here if they came, else hands the rest to a worker.
template <typename T>
ffi::Future Start(const Call& c) {
  switch (c.site->mode()) {
    case Mode::kAcross: return Defer(c, [](const Call& c) { return RunAcross<T>(c); });
    case Mode::kSpanning: return Defer(c, [](const Call& c) { return RunSpanning<T>(c); });
    case Mode::kLocal: break;
  }
  const bool small = c.desc.count * static_cast<int64_t>(sizeof(T)) <= c.site->small_bytes();
  // `arrived`: this rank already saw every rank arrive (and is working).
  auto finish = [small](const Call& c, Rendezvous* r, bool arrived) {
    return small ? FinishSmall<T>(c, r, arrived) : FinishLarge<T>(c, r, arrived);
  };
  if (c.fault == FaultKind::kDelay || c.fault == FaultKind::kHold) {
    // Test faults: the whole call late (by `ms`, or until released), on a worker.
    return Defer(c, [finish, small](const Call& c) {
      if (c.fault == FaultKind::kHold) {
        WaitHold(c.fault_ms);
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(c.fault_ms));
      }
      const Member me = small ? PrepareSmall<T>(c) : PrepareLarge<T>(c, false);
      Failure error;
      Rendezvous* r = Join(c, c.site->plan().num_ranks(), &error);
      if (r == nullptr) return FailWith(error);
      if (!r->Publish(c.rank, me, &error)) return LeaveFailed(c, r, c.rank, &error, false);
      return finish(c, r, false);
    });
  }
  const Member me = small ? PrepareSmall<T>(c) : PrepareLarge<T>(c, false);
  Failure error;
  Rendezvous* r = Join(c, c.site->plan().num_ranks(), &error);
  if (r == nullptr) return Done(c, FailWith(error));
  if (!r->Publish(c.rank, me, &error)) return Done(c, LeaveFailed(c, r, c.rank, &error, false));
  const int arrived = r->AwaitAll(c.rank, Clock::now() + InlineWait(), c.deadline, &error);
  if (arrived < 0) return Done(c, LeaveFailed(c, r, c.rank, &error, false));
  if (arrived > 0) return Done(c, finish(c, r, true));
  return Defer(c, [finish, r](const Call& c) { return finish(c, r, false); }, r);
}

ffi::Future Dispatch(const Call& c) {
  switch (static_cast<ffi::DataType>(c.desc.dtype)) {
    case ffi::DataType::F32: return Start<float>(c);
    case ffi::DataType::F64: return Start<double>(c);
    case ffi::DataType::BF16: return Start<bf16_t>(c);
    case ffi::DataType::F16: return Start<f16_t>(c);
    case ffi::DataType::S32: return Start<int32_t>(c);
    case ffi::DataType::S64: return Start<int64_t>(c);
    default: return Done(c, Fail(ffi::ErrorCode::kInternal, "jax_ddl_allreduce: dtype dispatch"));
  }
}

ffi::Error ReadScalar(ffi::AnyBuffer buf, const char* what, int64_t* value) {
  if (buf.element_type() != ffi::DataType::S32 || buf.element_count() != 1) {
    return Fail(ffi::ErrorCode::kInvalidArgument,
                std::string("jax_ddl_allreduce: operand '") + what + "' must be an int32 scalar");
  }
  *value = *static_cast<const int32_t*>(buf.untyped_data());
  return ffi::Error::Success();
}

// Instantiate stage: once per custom-call instruction when XLA compiles a program.
ffi::ErrorOr<std::unique_ptr<Site>> InstantiateCpu(int32_t op, ffi::Span<const int64_t> dims,
                                                   int64_t timeout_ms, int64_t small_bytes,
                                                   int64_t chunk_bytes,
                                                   ffi::Span<const int64_t> device_ranks,
                                                   int64_t module, int64_t site,
                                                   std::string_view name) {
  if (op < 0 || op > 2) {
    return ffi::Unexpected(ffi::Error(
        ffi::ErrorCode::kInvalidArgument,
        "jax_ddl_allreduce: op must be 0 (sum), 1 (max) or 2 (min); got " + std::to_string(op)));
  }
  std::vector<int64_t> grid(dims.begin(), dims.end());
  int64_t ranks = 1;
  for (int64_t d : grid) ranks *= d;
  Plan plan;
  std::string error;
  if (!Plan::Make(grid, ranks, &plan, &error)) {
    return ffi::Unexpected(
        ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_ddl_allreduce: " + error));
  }
  SiteIdentity id = MakeIdentity(module, site, name);
  return std::make_unique<Site>(std::move(id), static_cast<Op>(op), std::move(grid), timeout_ms,
                                small_bytes, chunk_bytes,
                                std::vector<int64_t>(device_ranks.begin(), device_ranks.end()));
}

ffi::Future AllreduceCpu(ffi::RunId run_id, int32_t device, Site* site, ffi::AnyBuffer rank_buf,
                         ffi::AnyBuffer group_buf, ffi::RemainingArgs args,
                         ffi::RemainingRets rets) {
  const auto start = Clock::now();
  if (g_unsafe.load()) {
    return Ready(Fail(ffi::ErrorCode::kFailedPrecondition,
                      "jax_ddl: an earlier call failed while peers were still writing into its "
                      "buffers, so this process's memory can no longer be trusted; restart it"));
  }
  int64_t rank = 0, group = 0;
  if (auto e = ReadScalar(rank_buf, "rank", &rank); e.failure()) return Ready(std::move(e));
  if (auto e = ReadScalar(group_buf, "group", &group); e.failure()) return Ready(std::move(e));
  if (site->has_device_ranks() && !site->RanksOf(device, &rank, &group)) {
    return Ready(Fail(ffi::ErrorCode::kInvalidArgument,
                      "jax_ddl_allreduce: device " + std::to_string(device) +
                          " is not in the mesh this call was lowered for"));
  }
  std::string error;
  if (!site->Prepare(&error)) {
    return Ready(Fail(ffi::ErrorCode::kInvalidArgument, "jax_ddl_allreduce: " + error));
  }
  const Plan& plan = site->plan();
  if (rank < 0 || rank >= plan.num_ranks()) {
    return Ready(Fail(ffi::ErrorCode::kInvalidArgument,
                      "jax_ddl_allreduce: rank " + std::to_string(rank) + " is outside topology " +
                          FormatTopology(plan.dims()) + " of " +
                          std::to_string(plan.num_ranks()) + " ranks"));
  }
  if (site->mode() != Mode::kLocal) {
    const ProcessLayout& pl = MpiLayout();
    const int64_t local_rank = rank - pl.process * pl.slots;
    if (local_rank < 0 || local_rank >= pl.slots) {
      return Ready(Fail(ffi::ErrorCode::kInvalidArgument,
                        "jax_ddl_allreduce: rank " + std::to_string(rank) + " runs in process " +
                            std::to_string(pl.process) + ", whose ranks should be " +
                            std::to_string(pl.process * pl.slots) + ".." +
                            std::to_string((pl.process + 1) * pl.slots - 1) +
                            ": order the mesh's devices process by process, as jax.devices() "
                            "does"));
    }
  }
  const size_t n = args.size();
  if (rets.size() != n || n == 0) {
    return Ready(Fail(ffi::ErrorCode::kInvalidArgument,
                      "jax_ddl_allreduce: expected one result per operand and at least one "
                      "operand; got " + std::to_string(n) + " operands and " +
                          std::to_string(rets.size()) + " results"));
  }

  DeviceSite& ds = site->device(device);
  if (ds.busy.exchange(true)) {
    return Ready(Fail(ffi::ErrorCode::kFailedPrecondition,
                      site->context() + ": this call is already running on device " +
                          std::to_string(device) +
                          " (two executions of one program overlapping on a device)"));
  }
  auto release = [&](ffi::Error e) {
    ds.busy = false;
    return Ready(std::move(e));
  };
  // Buffers: same dtype throughout, each result the shape of its operand.
  ds.inputs.resize(n);
  ds.outputs.resize(n);
  ds.offsets.resize(n + 1);
  ds.offsets[0] = 0;
  Descriptor desc;
  desc.op = static_cast<int32_t>(site->op());
  desc.num_buffers = static_cast<int64_t>(n);
  uint64_t hash = 1469598103934665603ull;
  ffi::DataType dtype = ffi::DataType::INVALID;
  for (size_t i = 0; i < n; ++i) {
    auto in = args.get<ffi::AnyBuffer>(i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (!in.has_value() || !out.has_value()) {
      return release(Fail(ffi::ErrorCode::kInvalidArgument,
                          "jax_ddl_allreduce: operand " + std::to_string(i) +
                              " is not a buffer"));
    }
    if (i == 0) dtype = in->element_type();
    if (in->element_type() != dtype || (*out)->element_type() != dtype ||
        (*out)->element_count() != in->element_count()) {
      return release(Fail(ffi::ErrorCode::kInvalidArgument,
                          "jax_ddl_allreduce: operand " + std::to_string(i) +
                              " differs in dtype or size from operand 0 or from its result; "
                              "one call reduces buffers of one dtype"));
    }
    ds.inputs[i] = static_cast<char*>(in->untyped_data());
    ds.outputs[i] = static_cast<char*>((*out)->untyped_data());
    const int64_t count = static_cast<int64_t>(in->element_count());
    ds.offsets[i + 1] = ds.offsets[i] + count;
    hash = (hash ^ static_cast<uint64_t>(count)) * 1099511628211ull;
  }
  desc.count = ds.offsets[n];
  desc.dtype = static_cast<int32_t>(dtype);
  desc.layout_hash = static_cast<int64_t>(hash);
  desc.dtype_name = DtypeName(dtype);
  if (desc.dtype_name == nullptr) {
    return release(Fail(ffi::ErrorCode::kInvalidArgument,
                        "jax_ddl_allreduce: unsupported dtype #" + std::to_string(desc.dtype) +
                            "; supported: float32, float64, bfloat16, float16, int32, int64"));
  }
  const int64_t elem = static_cast<int64_t>(ffi::ByteWidth(dtype));
  Counters& k = GetCounters();
  k.calls.fetch_add(1, std::memory_order_relaxed);
  k.bytes.fetch_add(desc.count * elem, std::memory_order_relaxed);

  if (plan.num_ranks() == 1 || desc.count == 0) {
    for (size_t i = 0; i < n; ++i) {
      if (ds.outputs[i] != ds.inputs[i]) {
        std::memcpy(ds.outputs[i], ds.inputs[i], (ds.offsets[i + 1] - ds.offsets[i]) * elem);
      }
    }
    return release(ffi::Error::Success());
  }
  ds.peer_ptrs.resize(plan.num_ranks());
  ds.dst_ptrs.resize(plan.num_ranks());

  Call c;
  c.fault = TakeFault(rank, &c.fault_ms);
  if (c.fault == FaultKind::kSkip) return release(ffi::Error::Success());
  if (c.fault == FaultKind::kLie) desc.count += 1;
  if (!ds.seen_run || ds.last_run_id != run_id.run_id) {
    ds.seen_run = true;
    ds.last_run_id = run_id.run_id;
    ds.occurrence = 0;
  }
  c.site = site;
  c.ds = &ds;
  c.device = device;
  c.rank = rank;
  c.op = site->op();
  c.desc = desc;
  c.key = RendezvousKey{run_id.run_id, site->serial(), group, ds.occurrence++};
  c.start = start;
  ds.met = Clock::time_point{};
  c.deadline = Deadline(start, site->timeout_ms());

  return Dispatch(c);
}

// jax_ddl_gate: its results are its first operands (aliased; copied where XLA did not
// alias them), the operands past them only waited for. Why: src/jax_ddl/_src/gate.py.
ffi::Error GateCpu(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  if (args.size() < rets.size()) {
    return Fail(ffi::ErrorCode::kInvalidArgument,
                "jax_ddl_gate: expected at least one operand per result; got " +
                    std::to_string(args.size()) + " operands and " +
                    std::to_string(rets.size()) + " results");
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto in = args.get<ffi::AnyBuffer>(i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (!in.has_value() || !out.has_value() || in->size_bytes() != (*out)->size_bytes()) {
      return Fail(ffi::ErrorCode::kInvalidArgument,
                  "jax_ddl_gate: operand " + std::to_string(i) +
                      " is not a buffer of its result's size");
    }
    if (in->untyped_data() != (*out)->untyped_data()) {
      std::memcpy((*out)->untyped_data(), in->untyped_data(), in->size_bytes());
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kGateCpu, GateCpu,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kAllreduceCpuInstantiate, InstantiateCpu,
                              ffi::Ffi::BindInstantiate()
                                  .Attr<int32_t>("op")        // 0 sum, 1 max, 2 min
                                  .Attr<ffi::Span<const int64_t>>("dims")  // topology grid
                                  .Attr<int64_t>("timeout_ms")   // deadline of the call; < 0: none
                                  .Attr<int64_t>("small_bytes")  // one-shot path at or below this
                                  .Attr<int64_t>("chunk_bytes")  // pipeline chunk across processes
                                  .Attr<ffi::Span<const int64_t>>("device_ranks")  // id, rank, group
                                  .Attr<int64_t>("module")    // n-th lowered module of this name
                                  .Attr<int64_t>("site")      // ordinal of the call in the module
                                  .Attr<std::string_view>("name"));  // the module's name

XLA_FFI_DEFINE_HANDLER_SYMBOL(kAllreduceCpu, AllreduceCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::RunId>()  // same on all devices of one execution
                                  .Ctx<ffi::DeviceOrdinal>()  // local device: keys per-device state
                                  .Ctx<ffi::State<Site>>()    // this instruction's call site
                                  .Arg<ffi::AnyBuffer>()      // rank in the reduced axes (int32)
                                  .Arg<ffi::AnyBuffer>()      // group: index over other axes (int32)
                                  .RemainingArgs()            // the buffers to reduce, one dtype
                                  .RemainingRets());          // results, may alias the buffers

}  // namespace jax_ddl
