// jax_ddl_allreduce on CPU: DDL's multi-dimensional allreduce over the devices of one
// process through shared memory. Each device thread reads its peers' buffers directly,
// reduces the slice it owns at each stage and writes each final slice into every output.
#include "cpu_handler.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels.h"
#include "mpi_transport.h"
#include "rendezvous.h"
#include "topology.h"

namespace ffi = xla::ffi;

namespace jax_ddl {
namespace {

uint64_t Nanos(Clock::time_point a, Clock::time_point b) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count());
}

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

// Everything one call needs, gathered by the handler before dtype dispatch.
struct Call {
  int64_t device;
  int64_t rank;
  Op op;
  int64_t small_bytes;
  Clock::time_point deadline;
  Descriptor desc;
  const Plan* plan;
  SiteState* site;
  const std::vector<int64_t>* offsets;
  RendezvousKey key;
  const std::string* context;
};

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

ffi::Error FailRendezvous(const Failure& f) {
  return Fail(f.deadline ? ffi::ErrorCode::kDeadlineExceeded : ffi::ErrorCode::kFailedPrecondition,
              f.message);
}

// Small messages: one barrier. Each rank copies its input into one half of a
// double-buffered staging area, then every rank reduces all of it in plan order. The next
// call at this site writes the other half, and the one after can only start once every
// peer has arrived at the next call, i.e. finished reading: no exit barrier is needed.
template <typename T>
ffi::Error RunSmall(const Call& c) {
  using A = typename AccumOf<T>::type;
  SiteState& site = *c.site;
  const Plan& plan = *c.plan;
  const int64_t count = c.desc.count;
  const auto& offsets = *c.offsets;
  std::vector<char>& staging = site.staging[site.sequence & 1];
  staging.resize(count * sizeof(T));
  ForEachPiece(offsets, Range{0, count}, [&](int64_t seg, int64_t begin, int64_t len) {
    std::memcpy(staging.data() + begin * sizeof(T), site.inputs[seg], len * sizeof(T));
  });
  Member me{c.device, c.desc, site.inputs.data(), site.outputs.data(), nullptr, staging.data()};
  const auto t0 = Clock::now();
  Rendezvous* r = Registry::Get().Join(c.key, plan.num_ranks(), *c.context);
  Failure error;
  const bool ok = r->Arrive(c.rank, me, c.deadline, &error);
  if (ok) {
    for (int64_t q = 0; q < plan.num_ranks(); ++q) site.peer_ptrs[q] = r->member(q).staging;
  }
  Registry::Get().Leave(r);
  if (!ok) return FailRendezvous(error);
  const auto t1 = Clock::now();

  // Nested accumulation in plan order: level j holds the partial sum over dimension j.
  constexpr int64_t kBlock = 1024;
  const int levels = plan.num_stages();
  site.accum.resize(levels * kBlock * sizeof(A));
  A* acc = reinterpret_cast<A*>(site.accum.data());
  for (int64_t base = 0; base < count; base += kBlock) {
    const int64_t m = std::min(kBlock, count - base);
    for (int64_t q = 0; q < plan.num_ranks(); ++q) {
      const T* src = reinterpret_cast<const T*>(site.peer_ptrs[q]) + base;
      AccumulateDispatch<A, T>(c.op, plan.Coord(q, 0) == 0, src, acc, m);
      for (int j = 0; j + 1 < levels && plan.Coord(q, j) == plan.dim(j) - 1; ++j) {
        AccumulateDispatch<A, A>(c.op, plan.Coord(q, j + 1) == 0, acc + j * kBlock,
                                 acc + (j + 1) * kBlock, m);
      }
    }
    const A* result = acc + (levels - 1) * kBlock;
    ForEachPiece(offsets, Range{base, base + m}, [&](int64_t seg, int64_t begin, int64_t len) {
      T* out = reinterpret_cast<T*>(site.outputs[seg] + (begin - offsets[seg]) * sizeof(T));
      for (int64_t i = 0; i < len; ++i) out[i] = Store<T>(result[begin - base + i]);
    });
  }
  Counters& k = GetCounters();
  k.small_calls.fetch_add(1, std::memory_order_relaxed);
  k.arrive_ns.fetch_add(Nanos(t0, t1), std::memory_order_relaxed);
  k.small_ns.fetch_add(Nanos(t1, Clock::now()), std::memory_order_relaxed);
  return ffi::Error::Success();
}

const char* DtypeName(ffi::DataType t);

std::string DescribeHeader(const ProcessHeader& h) {
  static const char* kOps[] = {"sum", "max", "min"};
  std::string buffers;
  if (h.num_buffers > 1) {
    char hash[24];
    std::snprintf(hash, sizeof(hash), "%llx", static_cast<unsigned long long>(h.layout_hash));
    buffers = " in " + std::to_string(h.num_buffers) + " buffers (layout " + hash + ")";
  }
  return "call " + std::to_string(h.call_id) + " (" + std::to_string(h.count) + " elements of " +
         DtypeName(static_cast<ffi::DataType>(h.dtype)) + buffers + ", " +
         (h.op >= 0 && h.op <= 2 ? kOps[h.op] : "op ?") + ")";
}

template <typename A>
void ReduceAccum(int op, const char* const* srcs, int64_t n_src, char* dst, int64_t n) {
  char* dsts[1] = {dst};
  ReduceDispatch<A, A, A>(static_cast<Op>(op), srcs, n_src, dsts, 1, n);
}

// Large messages: DDL's schedule. Reduce-scatter stage by stage: at each stage a rank
// reduces the slice it owns from its group's copies. At the last stage the owner of a
// final slice writes it straight into every rank's output: in shared memory that is the
// whole reverse all-gather in one step, each byte written once and never re-read. Only
// the owner ever touches a final slice, in any buffer, so this is safe in place too.
// Every element is reduced in the plan's fixed order: all ranks get identical bits.
//
// Across processes (DDL's hierarchy) the plan is the local one and the last local stage
// writes the owner's slice into `proc_buf` instead; that slice is allreduced with the
// same slot of every other process over MPI (one communicator per slot, so all slots run
// at once) and then written into every local output. The order stays fixed by the two
// plans, so every device of every process gets the same bits.
template <typename T>
ffi::Error RunLarge(const Call& c, const Plan& plan, int64_t rank, bool cross, int64_t call_id) {
  using A = typename AccumOf<T>::type;
  constexpr bool kSameAcc = std::is_same_v<A, T>;
  SiteState& site = *c.site;
  const int64_t count = c.desc.count;
  const int64_t ranks = plan.num_ranks();
  const auto& offsets = *c.offsets;
  const int stages = plan.num_stages();
  // 16-bit floats keep intermediate stages in float32 so they are rounded only once.
  const bool scratch = !kSameAcc && stages > 1;
  if (scratch) site.inter.resize(count * sizeof(A));
  Member me{c.device, c.desc, site.inputs.data(), site.outputs.data(),
            scratch ? site.inter.data() : nullptr, nullptr};

  const auto t0 = Clock::now();
  Rendezvous* r = Registry::Get().Join(c.key, ranks, *c.context);
  Failure error;
  if (!r->Arrive(rank, me, c.deadline, &error)) {
    Registry::Get().Leave(r);
    return FailRendezvous(error);
  }
  const auto t1 = Clock::now();
  auto input_view = [&](int64_t q) { return View{r->member(q).inputs, nullptr, sizeof(T)}; };
  auto output_view = [&](int64_t q) { return View{r->member(q).outputs, nullptr, sizeof(T)}; };
  auto inter_view = [&](int64_t q) {
    return scratch ? View{nullptr, r->member(q).inter, sizeof(A)} : output_view(q);
  };
  const Range mine = plan.Region(rank, stages, count);
  A* buf = nullptr;
  if (cross) {
    site.proc_buf.resize(std::max<int64_t>(1, mine.size()) * sizeof(A));
    buf = reinterpret_cast<A*>(site.proc_buf.data());
  }
  // Writes `len` elements from `src` (accumulator or T) into every rank's output at `begin`.
  auto broadcast = [&](int64_t seg, int64_t begin, int64_t len, const char* const* srcs,
                       int64_t n_src, bool src_acc) {
    for (int64_t q = 0; q < ranks; ++q) {
      site.dst_ptrs[q] = output_view(q).At(offsets.data(), seg, begin);
    }
    if (src_acc) {
      ReduceDispatch<A, A, T>(c.op, srcs, n_src, site.dst_ptrs.data(), ranks, len);
    } else {
      ReduceDispatch<A, T, T>(c.op, srcs, n_src, site.dst_ptrs.data(), ranks, len);
    }
  };

  bool ok = true;
  auto t2 = t1;
  for (int s = 0; s < stages && ok; ++s) {
    const int64_t group_size = plan.dim(s);
    const bool last = s == stages - 1;
    const bool src_acc = s > 0 && scratch;
    if (last) t2 = Clock::now();
    ForEachPiece(offsets, plan.Region(rank, s + 1, count),
                 [&](int64_t seg, int64_t begin, int64_t len) {
      for (int64_t g = 0; g < group_size; ++g) {
        const int64_t q = plan.Peer(rank, s, g);
        const View v = s == 0 ? input_view(q) : inter_view(q);
        site.peer_ptrs[g] = v.At(offsets.data(), seg, begin);
      }
      if (last && !cross) {
        broadcast(seg, begin, len, site.peer_ptrs.data(), group_size, src_acc);
        return;
      }
      char* dst = last ? reinterpret_cast<char*>(buf + (begin - mine.begin))
                       : inter_view(rank).At(offsets.data(), seg, begin);
      if (src_acc) {
        ReduceDispatch<A, A, A>(c.op, site.peer_ptrs.data(), group_size, &dst, 1, len);
      } else {
        ReduceDispatch<A, T, A>(c.op, site.peer_ptrs.data(), group_size, &dst, 1, len);
      }
    });
    if (!last || !cross) {
      ok = r->Barrier(rank, s + 1, last ? "exit" : "reduce-scatter", c.deadline, &error);
    }
  }
  if (ok && cross) {
    t2 = Clock::now();  // for the counters the MPI exchange counts as reduce-scatter
    const ProcessHeader header{call_id, count, c.desc.dtype, static_cast<int64_t>(c.op),
                               c.desc.num_buffers, c.desc.layout_hash};
    if (!MpiAllreduce(rank, site.proc_buf.data(), mine.size(), sizeof(A), static_cast<int>(c.op),
                      &ReduceAccum<A>, site.proc_plan, header, &DescribeHeader, c.deadline,
                      &site.proc_scratch, &error)) {
      error.message = *c.context + ", local slot " + std::to_string(rank) + ": " + error.message;
      Registry::Get().Leave(r);
      return FailRendezvous(error);
    }
    t2 = Clock::now();
    ForEachPiece(offsets, mine, [&](int64_t seg, int64_t begin, int64_t len) {
      const char* src = reinterpret_cast<const char*>(buf + (begin - mine.begin));
      broadcast(seg, begin, len, &src, 1, true);
    });
    ok = r->Barrier(rank, stages, "exit", c.deadline, &error);
  }
  Registry::Get().Leave(r);
  if (!ok) return FailRendezvous(error);
  Counters& k = GetCounters();
  k.arrive_ns.fetch_add(Nanos(t0, t1), std::memory_order_relaxed);
  k.reduce_scatter_ns.fetch_add(Nanos(t1, t2), std::memory_order_relaxed);
  k.broadcast_ns.fetch_add(Nanos(t2, Clock::now()), std::memory_order_relaxed);
  return ffi::Error::Success();
}

// MPI's progress is weak: a send may need its receiver to go on calling MPI after the
// receive has completed (measured: without this, 1 run in 3 of the training program with
// the flat spec left a process waiting for its last sends while the peer had moved on to
// other work). So each device thread, once all its messages are through, tells every
// remote group peer and waits for the same word back: no thread leaves while a peer
// still needs it to make progress.
bool MpiDone(int64_t slot, const Plan& plan, int64_t me, Clock::time_point deadline,
             Failure* error) {
  const ProcessLayout& pl = MpiLayout();
  thread_local std::vector<int64_t> remote;
  thread_local std::vector<char> words;
  remote.clear();
  for (int st = 0; st < plan.num_stages(); ++st) {
    for (int64_t g = 0; g < plan.dim(st); ++g) {
      const int64_t q = plan.Peer(me, st, g);
      if (q / pl.slots != pl.process) remote.push_back(q);
    }
  }
  if (remote.empty()) return true;
  std::sort(remote.begin(), remote.end());
  remote.erase(std::unique(remote.begin(), remote.end()), remote.end());
  static const char kDone = 1;
  words.assign(remote.size(), 0);
  for (size_t i = 0; i < remote.size(); ++i) {
    MpiPostRecv(slot, remote[i] / pl.slots, remote[i] % pl.slots, &words[i], 1);
    MpiPostSend(slot, remote[i] / pl.slots, remote[i] % pl.slots, &kDone, 1);
  }
  return MpiWait(deadline, "cross-process completion", error);
}

// A plan whose groups span processes (a flat spec over all devices of all processes, or
// any grid that does not split at a process boundary): every stage of DDL's schedule
// exchanges with its group peers, the local ones through shared memory, the remote ones
// over MPI (a stream per pair of device threads). Reduce-scatter stage by stage: a rank
// receives the remote copies of the slice it owns next and reduces them with the local
// copies in group order, so every process gets the bits one process would. At the last
// stage the owner writes its final slice into the outputs of its local group peers; the
// all-gather then runs the stages in reverse, remote slices over MPI, local ones copied
// from the peers' outputs.
template <typename T>
ffi::Error RunSpanning(const Call& c, int64_t slot, int64_t call_id) {
  using A = typename AccumOf<T>::type;
  constexpr bool kSameAcc = std::is_same_v<A, T>;
  SiteState& site = *c.site;
  const Plan& plan = *c.plan;
  const ProcessLayout& pl = MpiLayout();
  const int64_t slots = pl.slots, base = pl.process * slots, me = c.rank;
  const int64_t count = c.desc.count;
  const auto& offsets = *c.offsets;
  const int stages = plan.num_stages();
  const bool scratch = !kSameAcc && stages > 1;
  if (scratch) site.inter.resize(count * sizeof(A));
  Member m{c.device, c.desc, site.inputs.data(), site.outputs.data(),
           scratch ? site.inter.data() : nullptr, nullptr};

  const auto t0 = Clock::now();
  Rendezvous* r = Registry::Get().Join(c.key, slots, *c.context);
  Failure error;
  auto fail = [&](bool mpi) {
    if (mpi) {
      error.message = *c.context + ", local slot " + std::to_string(slot) + ": " + error.message;
    }
    Registry::Get().Leave(r);
    return FailRendezvous(error);
  };
  if (!r->Arrive(slot, m, c.deadline, &error)) return fail(false);
  const ProcessHeader header{call_id, count, c.desc.dtype, static_cast<int64_t>(c.op),
                             c.desc.num_buffers, c.desc.layout_hash};
  if (!MpiHandshake(slot, site.handshake_procs, header, &DescribeHeader, c.deadline, &error)) {
    return fail(true);
  }
  const auto t1 = Clock::now();
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
  // Posts one message per piece of `range` (buffers split it where they split everywhere).
  auto post = [&](bool send, int64_t q, const View& v, Range range) {
    ForEachPiece(offsets, range, [&](int64_t seg, int64_t begin, int64_t len) {
      char* p = v.At(offsets.data(), seg, begin);
      if (send) {
        MpiPostSend(slot, q / slots, q % slots, p, len * v.elem);
      } else {
        MpiPostRecv(slot, q / slots, q % slots, p, len * v.elem);
      }
    });
  };

  int phase = 1;
  for (int s = 0; s < stages; ++s) {
    const int64_t k = plan.dim(s);
    const bool last = s == stages - 1;
    const bool src_acc = s > 0 && scratch;
    const int64_t es = src_acc ? sizeof(A) : sizeof(T);
    const Range mine = plan.Region(me, s + 1, count);
    int64_t remote = 0;
    for (int64_t g = 0; g < k; ++g) remote += !local(plan.Peer(me, s, g));
    if (site.recv_buf.size() < static_cast<size_t>(remote * mine.size() * es)) {
      site.recv_buf.resize(remote * mine.size() * es);
    }
    // Remote copies of my slice land in recv_buf, one contiguous block per remote peer.
    for (int64_t g = 0, i = 0; g < k; ++g) {
      const int64_t q = plan.Peer(me, s, g);
      if (local(q)) continue;
      post(false, q, View{nullptr, site.recv_buf.data() + i * mine.size() * es, es, mine.begin},
           mine);
      post(true, q, s == 0 ? input_view(me) : inter_view(me), plan.Region(q, s + 1, count));
      ++i;
    }
    if (remote > 0 && !MpiWait(c.deadline, "cross-process reduce-scatter", &error)) {
      return fail(true);
    }
    ForEachPiece(offsets, mine, [&](int64_t seg, int64_t begin, int64_t len) {
      int64_t n_dst = 0;
      for (int64_t g = 0, i = 0; g < k; ++g) {
        const int64_t q = plan.Peer(me, s, g);
        if (local(q)) {
          const View v = s == 0 ? input_view(q) : inter_view(q);
          site.peer_ptrs[g] = v.At(offsets.data(), seg, begin);
          if (last) site.dst_ptrs[n_dst++] = output_view(q).At(offsets.data(), seg, begin);
        } else {
          site.peer_ptrs[g] = site.recv_buf.data() + (i * mine.size() + begin - mine.begin) * es;
          ++i;
        }
      }
      char* inter_dst = last ? nullptr : inter_view(me).At(offsets.data(), seg, begin);
      char** dsts = last ? site.dst_ptrs.data() : &inter_dst;
      if (!last) n_dst = 1;
      if (last && src_acc) {
        ReduceDispatch<A, A, T>(c.op, site.peer_ptrs.data(), k, dsts, n_dst, len);
      } else if (last) {
        ReduceDispatch<A, T, T>(c.op, site.peer_ptrs.data(), k, dsts, n_dst, len);
      } else if (src_acc) {
        ReduceDispatch<A, A, A>(c.op, site.peer_ptrs.data(), k, dsts, n_dst, len);
      } else {
        ReduceDispatch<A, T, A>(c.op, site.peer_ptrs.data(), k, dsts, n_dst, len);
      }
    });
    // After the last stage no local peer reads what this rank writes next (the remote
    // slices of its output), so only the earlier stages need a barrier.
    if (!last && !r->Barrier(slot, phase++, "reduce-scatter", c.deadline, &error)) {
      return fail(false);
    }
  }
  const auto t2 = Clock::now();
  for (int s = stages - 1; s >= 0; --s) {
    const int64_t k = plan.dim(s);
    const Range mine = plan.Region(me, s + 1, count);
    bool remote = false;
    for (int64_t g = 0; g < k; ++g) {
      const int64_t q = plan.Peer(me, s, g);
      if (q == me || local(q)) continue;
      post(false, q, output_view(me), plan.Region(q, s + 1, count));
      post(true, q, output_view(me), mine);
      remote = true;
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
    if (remote && !MpiWait(c.deadline, "cross-process all-gather", &error)) return fail(true);
    if (s == 0 && !MpiDone(slot, plan, me, c.deadline, &error)) return fail(true);
    if (!r->Barrier(slot, phase++, s == 0 ? "exit" : "all-gather", c.deadline, &error)) {
      return fail(false);
    }
  }
  Registry::Get().Leave(r);
  Counters& k = GetCounters();
  k.arrive_ns.fetch_add(Nanos(t0, t1), std::memory_order_relaxed);
  k.reduce_scatter_ns.fetch_add(Nanos(t1, t2), std::memory_order_relaxed);
  k.broadcast_ns.fetch_add(Nanos(t2, Clock::now()), std::memory_order_relaxed);
  return ffi::Error::Success();
}

template <typename T>
ffi::Error RunTyped(const Call& c, int64_t local_rank, int64_t call_id) {
  if (c.site->cross) return RunLarge<T>(c, c.site->local_plan, local_rank, true, call_id);
  if (c.site->spanning) return RunSpanning<T>(c, local_rank, call_id);
  if (c.desc.count * static_cast<int64_t>(sizeof(T)) <= c.small_bytes) return RunSmall<T>(c);
  return RunLarge<T>(c, *c.plan, c.rank, false, call_id);
}

std::string FormatSeconds(int64_t ms) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g s", ms / 1000.0);
  return buf;
}

const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    default: return "an unsupported dtype";
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

ffi::Error AllreduceCpu(ffi::RunId run_id, int32_t device, ffi::AnyBuffer rank_buf,
                        ffi::AnyBuffer group_buf, ffi::RemainingArgs args,
                        ffi::RemainingRets rets, int32_t op, int64_t call_id,
                        ffi::Span<const int64_t> dims, int64_t timeout_ms,
                        int64_t small_bytes) {
  const auto start = Clock::now();
  int64_t rank = 0, group = 0;
  if (auto e = ReadScalar(rank_buf, "rank", &rank); e.failure()) return e;
  if (auto e = ReadScalar(group_buf, "group", &group); e.failure()) return e;
  if (op < 0 || op > 2) {
    return Fail(ffi::ErrorCode::kInvalidArgument,
                "jax_ddl_allreduce: op must be 0 (sum), 1 (max) or 2 (min); got " +
                    std::to_string(op));
  }
  SiteState& site = GetSiteState(device, call_id);
  if (site.plan_dims.size() != dims.size() ||
      !std::equal(dims.begin(), dims.end(), site.plan_dims.begin())) {
    site.plan_dims.assign(dims.begin(), dims.end());
    int64_t ranks = 1;
    for (int64_t d : site.plan_dims) ranks *= d;
    std::string error;
    if (!Plan::Make(site.plan_dims, ranks, &site.plan, &error)) {
      site.plan_dims.clear();
      return Fail(ffi::ErrorCode::kInvalidArgument, "jax_ddl_allreduce: " + error);
    }
    site.cross = site.spanning = false;
    const ProcessLayout& pl = MpiLayout();
    if (MpiAttached() && pl.processes > 1 && ranks == pl.slots * pl.processes) {
      // DDL's hierarchy when the grid splits at the process boundary: leading dimensions
      // that multiply to the local devices (shared memory), the rest over processes (MPI).
      std::vector<int64_t> local_dims, proc_dims;
      int64_t prod = 1;
      size_t i = 0;
      for (; i < site.plan_dims.size() && prod < pl.slots; ++i) {
        prod *= site.plan_dims[i];
        local_dims.push_back(site.plan_dims[i]);
      }
      proc_dims.assign(site.plan_dims.begin() + i, site.plan_dims.end());
      if (prod == pl.slots) {
        if (local_dims.empty()) local_dims.push_back(1);
        if (proc_dims.empty()) proc_dims.push_back(1);
        Plan::Make(local_dims, pl.slots, &site.local_plan, &error);
        Plan::Make(proc_dims, pl.processes, &site.proc_plan, &error);
        site.cross = true;
      } else {
        // Groups span processes (e.g. a flat spec): the whole plan, stage by stage. The
        // header goes to every process any local rank exchanges with; that relation is
        // symmetric, so every handshake has its partner.
        site.spanning = true;
        site.handshake_procs.clear();
        for (int64_t q = pl.process * pl.slots; q < (pl.process + 1) * pl.slots; ++q) {
          for (int st = 0; st < site.plan.num_stages(); ++st) {
            for (int64_t g = 0; g < site.plan.dim(st); ++g) {
              const int64_t p = site.plan.Peer(q, st, g) / pl.slots;
              if (p != pl.process) site.handshake_procs.push_back(p);
            }
          }
        }
        auto& hp = site.handshake_procs;
        std::sort(hp.begin(), hp.end());
        hp.erase(std::unique(hp.begin(), hp.end()), hp.end());
      }
    }
    site.peer_ptrs.assign(ranks, nullptr);
    site.dst_ptrs.assign(ranks, nullptr);
    site.context = "jax_ddl allreduce (call " + std::to_string(call_id) + ", group " +
                   std::to_string(group) + ", topology " + FormatTopology(site.plan_dims) +
                   ", timeout " + FormatSeconds(timeout_ms) + ")";
  }
  const Plan& plan = site.plan;
  if (rank < 0 || rank >= plan.num_ranks()) {
    return Fail(ffi::ErrorCode::kInvalidArgument,
                "jax_ddl_allreduce: rank " + std::to_string(rank) + " is outside topology " +
                    FormatTopology(plan.dims()) + " of " + std::to_string(plan.num_ranks()) +
                    " ranks");
  }

  int64_t local_rank = rank;
  if (site.cross || site.spanning) {
    const ProcessLayout& pl = MpiLayout();
    local_rank = rank - pl.process * pl.slots;
    if (local_rank < 0 || local_rank >= pl.slots) {
      return Fail(ffi::ErrorCode::kInvalidArgument,
                  "jax_ddl_allreduce: rank " + std::to_string(rank) + " runs in process " +
                      std::to_string(pl.process) + ", whose ranks should be " +
                      std::to_string(pl.process * pl.slots) + ".." +
                      std::to_string((pl.process + 1) * pl.slots - 1) +
                      ": order the mesh's devices process by process, as jax.devices() does");
    }
  }

  // Buffers: same dtype throughout, each result the shape of its operand.
  const size_t n = args.size();
  if (rets.size() != n || n == 0) {
    return Fail(ffi::ErrorCode::kInvalidArgument,
                "jax_ddl_allreduce: expected one result per operand and at least one operand; got " +
                    std::to_string(n) + " operands and " + std::to_string(rets.size()) + " results");
  }
  site.inputs.resize(n);
  site.outputs.resize(n);
  site.offsets.resize(n + 1);
  site.offsets[0] = 0;
  Descriptor desc;
  desc.op = op;
  desc.num_buffers = static_cast<int64_t>(n);
  uint64_t hash = 1469598103934665603ull;
  ffi::DataType dtype = ffi::DataType::INVALID;
  for (size_t i = 0; i < n; ++i) {
    auto in = args.get<ffi::AnyBuffer>(i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (!in.has_value() || !out.has_value()) {
      return Fail(ffi::ErrorCode::kInvalidArgument, "jax_ddl_allreduce: operand " +
                                                        std::to_string(i) + " is not a buffer");
    }
    if (i == 0) dtype = in->element_type();
    if (in->element_type() != dtype || (*out)->element_type() != dtype ||
        (*out)->element_count() != in->element_count()) {
      return Fail(ffi::ErrorCode::kInvalidArgument,
                  "jax_ddl_allreduce: operand " + std::to_string(i) +
                      " differs in dtype or size from operand 0 or from its result; one call "
                      "reduces buffers of one dtype");
    }
    site.inputs[i] = static_cast<char*>(in->untyped_data());
    site.outputs[i] = static_cast<char*>((*out)->untyped_data());
    const int64_t count = static_cast<int64_t>(in->element_count());
    site.offsets[i + 1] = site.offsets[i] + count;
    hash = (hash ^ static_cast<uint64_t>(count)) * 1099511628211ull;
  }
  desc.count = site.offsets[n];
  desc.dtype = static_cast<int32_t>(dtype);
  desc.layout_hash = static_cast<int64_t>(hash);

  desc.dtype_name = DtypeName(dtype);
  if (std::string(desc.dtype_name) == "an unsupported dtype") {
    return Fail(ffi::ErrorCode::kInvalidArgument,
                "jax_ddl_allreduce: unsupported dtype #" + std::to_string(desc.dtype) +
                    "; supported: float32, float64, bfloat16, float16, int32, int64");
  }
  const int64_t elem = static_cast<int64_t>(ffi::ByteWidth(dtype));
  Counters& k = GetCounters();
  k.calls.fetch_add(1, std::memory_order_relaxed);
  k.bytes.fetch_add(desc.count * elem, std::memory_order_relaxed);

  if (plan.num_ranks() == 1 || desc.count == 0) {
    for (size_t i = 0; i < n; ++i) {
      if (site.outputs[i] != site.inputs[i]) {
        std::memcpy(site.outputs[i], site.inputs[i], (site.offsets[i + 1] - site.offsets[i]) * elem);
      }
    }
    return ffi::Error::Success();
  }

  Fault& fault = GetFault();
  const int fault_kind = fault.kind.load(std::memory_order_relaxed);
  if (fault_kind != 0 && fault.rank.load(std::memory_order_relaxed) == rank) {
    if (fault_kind == static_cast<int>(FaultKind::kSkip)) return ffi::Error::Success();
    if (fault_kind == static_cast<int>(FaultKind::kLie)) desc.count += 1;
  }

  if (site.last_run_id != run_id.run_id) {
    site.last_run_id = run_id.run_id;
    site.occurrence = 0;
  }
  Call c;
  c.device = device;
  c.rank = rank;
  c.op = static_cast<Op>(op);
  c.small_bytes = small_bytes;
  c.deadline = start + std::chrono::milliseconds(timeout_ms);
  c.desc = desc;
  c.plan = &plan;
  c.site = &site;
  c.offsets = &site.offsets;
  c.key = RendezvousKey{run_id.run_id, call_id, group, site.occurrence++};
  c.context = &site.context;

  ffi::Error result;
  switch (dtype) {
    case ffi::DataType::F32: result = RunTyped<float>(c, local_rank, call_id); break;
    case ffi::DataType::F64: result = RunTyped<double>(c, local_rank, call_id); break;
    case ffi::DataType::BF16: result = RunTyped<bf16_t>(c, local_rank, call_id); break;
    case ffi::DataType::F16: result = RunTyped<f16_t>(c, local_rank, call_id); break;
    case ffi::DataType::S32: result = RunTyped<int32_t>(c, local_rank, call_id); break;
    case ffi::DataType::S64: result = RunTyped<int64_t>(c, local_rank, call_id); break;
    default: break;
  }
  ++site.sequence;
  return result;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kAllreduceCpu, AllreduceCpu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::RunId>()          // same on all devices of one execution
                                  .Ctx<ffi::DeviceOrdinal>()  // local device: keys per-site state
                                  .Arg<ffi::AnyBuffer>()      // rank in the reduced axes (int32)
                                  .Arg<ffi::AnyBuffer>()      // group: index over the other axes (int32)
                                  .RemainingArgs()            // the buffers to reduce, one dtype
                                  .RemainingRets()            // results, may alias the buffers
                                  .Attr<int32_t>("op")        // 0 sum, 1 max, 2 min
                                  .Attr<int64_t>("call_id")   // call site, unique per lowered instruction
                                  .Attr<ffi::Span<const int64_t>>("dims")  // topology grid
                                  .Attr<int64_t>("timeout_ms")   // deadline of every wait
                                  .Attr<int64_t>("small_bytes")  // one-shot path at or below this
);

}  // namespace jax_ddl
