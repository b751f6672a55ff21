// jax_ddl_allreduce on CUDA, over the GPUs of one process: DDL's plan stage by stage on the
// GPUs' own streams (cuda/schedule.h), kernels reading the group members' buffers through
// peer access (cuda/kernels.cu), synchronised on the device by bounded flag barriers.
//
// Per call, on the thread XLA calls it on for that GPU (one per GPU, concurrently):
// 1. the inputs are copied (stream-ordered) into the site's contiguous staging buffer on
//    this GPU, so every stage reads jax_ddl's own buffers (the same kernels serve CUDA IPC
//    between processes, where XLA's buffers cannot be shared);
// 2. the ranks meet on the host, matched by call identity as on CPU (rendezvous.h): they
//    agree on count, dtype and op, publish their staging and flag addresses and check peer
//    access (all or none go on); a rank that never arrives fails the others within
//    JAX_DDL_TIMEOUT, naming it. No data is waited for on the host;
// 3. each rank enqueues its schedule on its stream and returns; the device barriers order
//    the GPUs. A barrier that times out on the device (a GPU that stopped) records which
//    member never signalled; the site's next call reports it and the site fails from then
//    on.
// Not yet: processes (CUDA IPC within a host, NCCL or MPI between hosts).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/cuda_handler.h"
#include "cuda/launch.h"
#include "cuda/schedule.h"
#include "identity.h"
#include "rendezvous.h"
#include "topology.h"

namespace ffi = xla::ffi;

namespace jax_ddl {
namespace {

using cuda::BarrierError;
using cuda::Step;

ffi::Error Fail(ffi::ErrorCode code, const std::string& msg) {
  GetCounters().errors.fetch_add(1, std::memory_order_relaxed);
  return ffi::Error(code, msg);
}

std::string CudaText(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// One GPU's part of a site: its place in the plan, its staging and flags.
struct CudaDevice {
  int ordinal = -1;
  int sms = 1;
  std::atomic<bool> busy{false};
  bool placed = false;  // rank and group read, flags allocated
  int64_t rank = -1;
  int64_t group = -1;
  int64_t last_run_id = 0;
  bool seen_run = false;
  int64_t occurrence = 0;
  uint64_t calls = 0;  // calls enqueued: the next one's barriers use epochs after theirs
  char* in = nullptr;  // the inputs, contiguous (T)
  size_t in_bytes = 0;
  char* acc = nullptr;  // reduction results by stage (accumulator type)
  size_t acc_bytes = 0;
  char* out = nullptr;  // the gathered result when the call has several buffers (T)
  size_t out_bytes = 0;
  uint64_t* flags = nullptr;  // kMaxLocalRanks epochs, one per rank that signals here
  BarrierError* error_host = nullptr;
  BarrierError* error_dev = nullptr;
  int64_t steps_count = -1;
  std::vector<Step> steps;
  // Per call, kept so a warm call allocates nothing: the buffers, and what the members
  // published.
  std::vector<const char*> inputs;
  std::vector<char*> outputs;
  std::vector<int64_t> offsets;
  std::vector<const char*> peer_in, peer_acc;
  std::vector<uint64_t*> peer_flags;
  std::vector<int> peer_device;

  ~CudaDevice() {
    if (ordinal < 0) return;
    cudaSetDevice(ordinal);
    // cudaFree waits for this GPU's work; a peer reading this GPU's staging is inside a
    // call whose last barrier this GPU's stream has not passed yet (see schedule.h).
    for (char* p : {in, acc, out}) {
      if (p) cudaFree(p);
    }
    if (flags) cudaFree(flags);
    if (error_host) cudaFreeHost(error_host);
  }
};

class CudaSite {
 public:
  static ffi::TypeId id;
  CudaSite(SiteIdentity identity, Op op, std::vector<int64_t> dims, int64_t timeout_ms, Plan plan)
      : identity_(std::move(identity)),
        serial_(NextSiteSerial()),
        op_(op),
        dims_(std::move(dims)),
        timeout_ms_(timeout_ms),
        plan_(std::move(plan)),
        context_(SiteContext(identity_, dims_, timeout_ms_)) {}

  int64_t serial() const { return serial_; }
  Op op() const { return op_; }
  int64_t timeout_ms() const { return timeout_ms_; }
  const Plan& plan() const { return plan_; }
  const std::string& context() const { return context_; }

  CudaDevice& device(int ordinal) {
    std::lock_guard<std::mutex> lock(mu_);
    if (ordinal >= static_cast<int>(devices_.size())) devices_.resize(ordinal + 1);
    if (!devices_[ordinal]) {
      devices_[ordinal] = std::make_unique<CudaDevice>();
      devices_[ordinal]->ordinal = ordinal;
    }
    return *devices_[ordinal];
  }
  // After a failure the GPUs of this site are out of step: every later call fails.
  void Break(const std::string& message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.empty()) broken_ = message;
  }
  bool Broken(std::string* message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.empty()) return false;
    *message = broken_;
    return true;
  }

 private:
  SiteIdentity identity_;
  int64_t serial_;
  Op op_;
  std::vector<int64_t> dims_;
  int64_t timeout_ms_;
  Plan plan_;
  std::string context_;
  std::mutex mu_;
  std::vector<std::unique_ptr<CudaDevice>> devices_;
  std::string broken_;
};

ffi::TypeId CudaSite::id = {};
const XLA_FFI_TypeInfo kCudaSiteTypeInfo = ffi::MakeTypeInfo<CudaSite>();

// Peer access between the GPUs of this process, enabled once per ordered pair.
std::mutex g_peer_mu;
std::vector<std::vector<char>> g_peer;  // 1: enabled, 2: impossible

bool EnablePeer(int me, int peer, std::string* error) {
  if (me == peer) return true;
  std::lock_guard<std::mutex> lock(g_peer_mu);
  const int most = std::max(me, peer) + 1;
  if (static_cast<int>(g_peer.size()) < most) g_peer.resize(most);
  for (auto& row : g_peer) row.resize(g_peer.size(), 0);
  char& state = g_peer[me][peer];
  if (state == 0) {
    int can = 0;
    cudaError_t e = cudaDeviceCanAccessPeer(&can, me, peer);
    if (e == cudaSuccess && can) {
      e = cudaDeviceEnablePeerAccess(peer, 0);  // for the current device, `me`
      if (e == cudaErrorPeerAccessAlreadyEnabled) e = cudaSuccess;
      (void)cudaGetLastError();
    }
    state = e == cudaSuccess && can ? 1 : 2;
  }
  if (state == 2) {
    *error = "GPU " + std::to_string(me) + " cannot read the memory of GPU " +
             std::to_string(peer) +
             " (no peer access between them); jax_ddl's CUDA engine needs peer access "
             "between the GPUs of one process";
    return false;
  }
  return true;
}

// Grows a device buffer. Its old contents are dropped: only this GPU's earlier calls could
// still use it (peers read it only inside a call, whose last barrier this GPU's stream
// passes after them), so the stream is synchronised first. After a device barrier timed
// out, a late peer may still read it: then it is left allocated rather than freed.
bool Ensure(char** p, size_t* have, size_t need, cudaStream_t stream, const BarrierError* err,
            std::string* error) {
  if (*have >= need) return true;
  if (*p) {
    const cudaError_t e = cudaStreamSynchronize(stream);
    if (e == cudaSuccess && !(err && err->failed)) cudaFree(*p);
    *p = nullptr;
    *have = 0;
  }
  const cudaError_t e = cudaMalloc(p, need);
  if (e != cudaSuccess) {
    *p = nullptr;
    *error = "could not allocate " + std::to_string(need) + " bytes of staging (" + CudaText(e) +
             "); XLA preallocates most GPU memory: lower XLA_PYTHON_CLIENT_MEM_FRACTION or set "
             "XLA_PYTHON_CLIENT_PREALLOCATE=false";
    return false;
  }
  *have = need;
  return true;
}

const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32:
      return "float32";
    case ffi::DataType::F64:
      return "float64";
    case ffi::DataType::BF16:
      return "bfloat16";
    case ffi::DataType::F16:
      return "float16";
    case ffi::DataType::S32:
      return "int32";
    case ffi::DataType::S64:
      return "int64";
    default:
      return nullptr;
  }
}

bool ElemOf(ffi::DataType t, cuda::Elem* elem, int64_t* acc_bytes) {
  switch (t) {
    case ffi::DataType::F32:
      *elem = cuda::Elem::kF32, *acc_bytes = 4;
      return true;
    case ffi::DataType::F64:
      *elem = cuda::Elem::kF64, *acc_bytes = 8;
      return true;
    case ffi::DataType::BF16:
      *elem = cuda::Elem::kBF16, *acc_bytes = 4;
      return true;
    case ffi::DataType::F16:
      *elem = cuda::Elem::kF16, *acc_bytes = 4;
      return true;
    case ffi::DataType::S32:
      *elem = cuda::Elem::kI32, *acc_bytes = 4;
      return true;
    case ffi::DataType::S64:
      *elem = cuda::Elem::kI64, *acc_bytes = 8;
      return true;
    default:
      return false;
  }
}

// Reads the rank and group operands (int32 scalars on the GPU) once: an executable's
// devices, and so each device's rank at a site, never change. This first call waits for
// the stream; later calls do not. With several ranks it also sets up the barrier flags,
// the pinned record of a barrier timeout, and loads every kernel (a kernel loaded lazily
// could wait behind a spinning barrier).
ffi::Error Place(CudaSite* site, CudaDevice& d, cudaStream_t stream, ffi::AnyBuffer rank_buf,
                 ffi::AnyBuffer group_buf) {
  for (auto [buf, what] : {std::pair{&rank_buf, "rank"}, std::pair{&group_buf, "group"}}) {
    if (buf->element_type() != ffi::DataType::S32 || buf->element_count() != 1) {
      return Fail(ffi::ErrorCode::kInvalidArgument,
                  std::string("jax_ddl_allreduce: operand '") + what + "' must be an int32 scalar");
    }
  }
  const Plan& plan = site->plan();
  int32_t values[2] = {0, 0};
  cudaError_t e =
      cudaMemcpyAsync(&values[0], rank_buf.untyped_data(), 4, cudaMemcpyDeviceToHost, stream);
  if (e == cudaSuccess) {
    e = cudaMemcpyAsync(&values[1], group_buf.untyped_data(), 4, cudaMemcpyDeviceToHost, stream);
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream);
  auto failed = [&](cudaError_t e) {
    if (d.flags) cudaFree(d.flags);
    if (d.error_host) cudaFreeHost(d.error_host);
    d.flags = nullptr, d.error_host = nullptr, d.error_dev = nullptr;
    return Fail(ffi::ErrorCode::kInternal, site->context() + ": setting up GPU " +
                                               std::to_string(d.ordinal) + ": " + CudaText(e));
  };
  if (e != cudaSuccess) return failed(e);
  if (values[0] < 0 || values[0] >= plan.num_ranks()) {
    return Fail(ffi::ErrorCode::kInvalidArgument,
                "jax_ddl_allreduce: rank " + std::to_string(values[0]) + " is outside topology " +
                    FormatTopology(plan.dims()) + " of " + std::to_string(plan.num_ranks()) +
                    " ranks");
  }
  if (plan.num_ranks() > 1) {
    e = cudaMalloc(&d.flags, cuda::kMaxLocalRanks * sizeof(uint64_t));
    if (e == cudaSuccess) {
      e = cudaMemsetAsync(d.flags, 0, cuda::kMaxLocalRanks * sizeof(uint64_t), stream);
    }
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream);  // zero before a peer signals
    if (e == cudaSuccess) {
      e = cudaHostAlloc(&d.error_host, sizeof(BarrierError), cudaHostAllocMapped);
    }
    if (e == cudaSuccess) {
      std::memset(d.error_host, 0, sizeof(BarrierError));
      e = cudaHostGetDevicePointer(&d.error_dev, d.error_host, 0);
    }
    if (e == cudaSuccess) {
      e = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, d.ordinal);
    }
    if (e == cudaSuccess) e = static_cast<cudaError_t>(cuda::PreloadKernels());
    if (e != cudaSuccess) return failed(e);
  }
  d.rank = values[0];
  d.group = values[1];
  d.placed = true;
  return ffi::Error::Success();
}

// What an earlier call's device barrier recorded, as the error of this call.
std::string BarrierFailure(CudaSite* site, const CudaDevice& d) {
  const BarrierError& e = *d.error_host;
  std::string missing;
  for (const Step& st : d.steps) {
    if (st.kind != Step::Kind::kBarrier || st.index != static_cast<int64_t>(e.stage)) continue;
    for (size_t j = 0; j < st.ranks.size() && j < cuda::kMaxLocalRanks; ++j) {
      if (e.missing[j]) missing += (missing.empty() ? "" : ", ") + std::to_string(st.ranks[j]);
    }
  }
  return site->context() + ": on GPU " + std::to_string(d.ordinal) + " (rank " +
         std::to_string(d.rank) + "), a device-side barrier of an earlier call (barrier " +
         std::to_string(e.stage) + ") timed out waiting for ranks [" + missing +
         "]: that call's results are wrong, and this call site fails from now on";
}

ffi::ErrorOr<std::unique_ptr<CudaSite>> InstantiateCuda(int32_t op, ffi::Span<const int64_t> dims,
                                                        int64_t timeout_ms, int64_t small_bytes,
                                                        int64_t chunk_bytes,
                                                        ffi::Span<const int64_t> device_ranks,
                                                        int64_t module, int64_t site,
                                                        std::string_view name) {
  (void)small_bytes;   // the CUDA engine has one path
  (void)chunk_bytes;   // and no cross-process stages yet
  (void)device_ranks;  // empty on CUDA: the rank operands are read (the CPU engine's table
                       // is keyed by device id, a CUDA handler sees local ordinals)
  auto invalid = [](const std::string& m) {
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kInvalidArgument, "jax_ddl_allreduce: " + m));
  };
  if (op < 0 || op > 2) {
    return invalid("op must be 0 (sum), 1 (max) or 2 (min); got " + std::to_string(op));
  }
  std::vector<int64_t> grid(dims.begin(), dims.end());
  int64_t ranks = 1;
  for (int64_t d : grid) ranks *= d;
  Plan plan;
  std::string error;
  if (!Plan::Make(grid, ranks, &plan, &error)) return invalid(error);
  if (ranks > cuda::kMaxLocalRanks) {
    return invalid("topology " + FormatTopology(grid) + " has " + std::to_string(ranks) +
                   " ranks; the CUDA engine reduces over at most " +
                   std::to_string(cuda::kMaxLocalRanks) + " GPUs of one process");
  }
  for (int64_t d : grid) {
    if (d > cuda::kMaxGroup) {
      return invalid("topology " + FormatTopology(grid) + " has a dimension of " +
                     std::to_string(d) + "; the CUDA engine's groups have at most " +
                     std::to_string(cuda::kMaxGroup) + " members: factor it (\"" +
                     std::to_string(d) + "\" as \"" + std::to_string(d / 2) + "x2\", say)");
    }
  }
  return std::make_unique<CudaSite>(MakeIdentity(module, site, name), static_cast<Op>(op),
                                    std::move(grid), timeout_ms, std::move(plan));
}

ffi::Error AllreduceCuda(cudaStream_t stream, ffi::RunId run_id, int32_t ordinal, CudaSite* site,
                         ffi::AnyBuffer rank_buf, ffi::AnyBuffer group_buf, ffi::RemainingArgs args,
                         ffi::RemainingRets rets) {
  const auto start = Clock::now();
  std::string message;
  if (site->Broken(&message)) return Fail(ffi::ErrorCode::kFailedPrecondition, message);
  // The CUDA device is the stream's (XLA's device ordinal is a logical one, which may
  // differ); the runtime calls below go to it.
  int device = ordinal;
  if (cudaStreamGetDevice(stream, &device) != cudaSuccess) device = ordinal;
  (void)cudaGetLastError();
  ordinal = device;
  if (cudaError_t e = cudaSetDevice(ordinal); e != cudaSuccess) {
    return Fail(ffi::ErrorCode::kInternal, site->context() + ": " + CudaText(e));
  }
  CudaDevice& d = site->device(ordinal);
  if (d.busy.exchange(true)) {
    return Fail(ffi::ErrorCode::kFailedPrecondition,
                site->context() + ": this call is already running on GPU " +
                    std::to_string(ordinal) + " (two executions of one program overlapping)");
  }
  struct Release {
    CudaDevice& d;
    ~Release() { d.busy = false; }
  } release{d};
  if (!d.placed) {
    if (auto e = Place(site, d, stream, rank_buf, group_buf); e.failure()) return e;
  }
  if (d.error_host && d.error_host->failed) {
    message = BarrierFailure(site, d);
    site->Break(message);
    return Fail(ffi::ErrorCode::kDeadlineExceeded, message);
  }

  // Buffers: one dtype, each result the size of its operand.
  const size_t n = args.size();
  if (rets.size() != n || n == 0) {
    return Fail(ffi::ErrorCode::kInvalidArgument,
                "jax_ddl_allreduce: expected one result per operand and at least one operand");
  }
  std::vector<const char*>& inputs = d.inputs;
  std::vector<char*>& outputs = d.outputs;
  std::vector<int64_t>& offsets = d.offsets;
  inputs.resize(n);
  outputs.resize(n);
  offsets.assign(n + 1, 0);
  ffi::DataType dtype = ffi::DataType::INVALID;
  uint64_t hash = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) {
    auto in = args.get<ffi::AnyBuffer>(i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (!in.has_value() || !out.has_value()) {
      return Fail(ffi::ErrorCode::kInvalidArgument,
                  "jax_ddl_allreduce: operand " + std::to_string(i) + " is not a buffer");
    }
    if (i == 0) dtype = in->element_type();
    if (in->element_type() != dtype || (*out)->element_type() != dtype ||
        (*out)->element_count() != in->element_count()) {
      return Fail(ffi::ErrorCode::kInvalidArgument,
                  "jax_ddl_allreduce: operand " + std::to_string(i) +
                      " differs in dtype or size from operand 0 or from its result");
    }
    inputs[i] = static_cast<const char*>(in->untyped_data());
    outputs[i] = static_cast<char*>((*out)->untyped_data());
    const int64_t c = static_cast<int64_t>(in->element_count());
    offsets[i + 1] = offsets[i] + c;
    hash = (hash ^ static_cast<uint64_t>(c)) * 1099511628211ull;
  }
  cuda::Elem elem;
  int64_t acc_size = 0;
  if (!ElemOf(dtype, &elem, &acc_size)) {
    return Fail(ffi::ErrorCode::kInvalidArgument,
                "jax_ddl_allreduce: unsupported dtype #" + std::to_string(static_cast<int>(dtype)) +
                    "; supported: float32, float64, bfloat16, float16, int32, int64");
  }
  const int64_t es = static_cast<int64_t>(ffi::ByteWidth(dtype));
  const int64_t count = offsets[n];
  Counters& k = GetCounters();
  k.calls.fetch_add(1, std::memory_order_relaxed);
  k.bytes.fetch_add(count * es, std::memory_order_relaxed);
  const Plan& plan = site->plan();
  auto cuda_error = [&](cudaError_t e, const char* what) {
    message = site->context() + ": GPU " + std::to_string(ordinal) + " (rank " +
              std::to_string(d.rank) + "), " + what + ": " + CudaText(e);
    site->Break(message);
    return Fail(ffi::ErrorCode::kInternal, message);
  };

  if (plan.num_ranks() == 1 || count == 0) {
    for (size_t i = 0; i < n; ++i) {
      const int64_t bytes = (offsets[i + 1] - offsets[i]) * es;
      if (outputs[i] == inputs[i] || bytes == 0) continue;
      const cudaError_t e =
          cudaMemcpyAsync(outputs[i], inputs[i], bytes, cudaMemcpyDeviceToDevice, stream);
      if (e != cudaSuccess) return cuda_error(e, "copying the input");
    }
    return ffi::Error::Success();
  }

  // 1. Staging, and the inputs into it.
  std::string error;
  if (!Ensure(&d.in, &d.in_bytes, count * es, stream, d.error_host, &error) ||
      !Ensure(&d.acc, &d.acc_bytes, count * acc_size, stream, d.error_host, &error) ||
      (n > 1 && !Ensure(&d.out, &d.out_bytes, count * es, stream, d.error_host, &error))) {
    return Fail(ffi::ErrorCode::kResourceExhausted,
                site->context() + ": GPU " + std::to_string(ordinal) + ": " + error);
  }
  for (size_t i = 0; i < n; ++i) {
    const int64_t bytes = (offsets[i + 1] - offsets[i]) * es;
    if (bytes == 0) continue;
    const cudaError_t e =
        cudaMemcpyAsync(d.in + offsets[i] * es, inputs[i], bytes, cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return cuda_error(e, "staging the input");
  }

  // 2. Meet the other GPUs' threads: agree on the call, exchange addresses.
  if (!d.seen_run || d.last_run_id != run_id.run_id) {
    d.seen_run = true;
    d.last_run_id = run_id.run_id;
    d.occurrence = 0;
  }
  const RendezvousKey key{run_id.run_id, site->serial(), d.group, d.occurrence++};
  Descriptor desc;
  desc.count = count;
  desc.num_buffers = static_cast<int64_t>(n);
  desc.layout_hash = static_cast<int64_t>(hash);
  desc.dtype = static_cast<int32_t>(dtype);
  desc.op = static_cast<int32_t>(site->op());
  desc.dtype_name = DtypeName(dtype);
  const Clock::time_point deadline = Deadline(start, site->timeout_ms());
  Failure failure;
  Rendezvous* r = Registry::Get().Join(key, plan.num_ranks(), site->context(), &failure);
  if (r == nullptr) {
    return Fail(
        failure.deadline ? ffi::ErrorCode::kDeadlineExceeded : ffi::ErrorCode::kFailedPrecondition,
        failure.message);
  }
  Member me;
  me.device = ordinal;
  me.desc = desc;
  me.staging = d.in;
  me.inter = d.acc;
  me.flags = d.flags;
  auto failed = [&](Failure& f) {
    return Fail(
        f.deadline ? ffi::ErrorCode::kDeadlineExceeded : ffi::ErrorCode::kFailedPrecondition,
        f.message);
  };
  if (!r->Arrive(d.rank, me, deadline, &failure)) {
    Registry::Get().Leave(r, d.rank, Clock::now());
    return failed(failure);
  }
  const int64_t ranks = plan.num_ranks();
  std::vector<const char*>&peer_in = d.peer_in, &peer_acc = d.peer_acc;
  std::vector<uint64_t*>& peer_flags = d.peer_flags;
  std::vector<int>& peer_device = d.peer_device;
  peer_in.resize(ranks), peer_acc.resize(ranks), peer_flags.resize(ranks);
  peer_device.resize(ranks);
  for (int64_t q = 0; q < ranks; ++q) {
    const Member& m = r->member(q);
    peer_in[q] = m.staging, peer_acc[q] = m.inter, peer_flags[q] = m.flags;
    peer_device[q] = static_cast<int>(m.device);
  }
  // Every rank can read its group members' memory, or none enqueues anything: a rank that
  // returned here after the others had queued their barriers would leave them spinning.
  for (int64_t q = 0; q < ranks && error.empty(); ++q) EnablePeer(ordinal, peer_device[q], &error);
  if (!error.empty()) {
    failure = Failure{false, false, site->context() + ": " + error};
    site->Break(failure.message);
    Registry::Get().Fail(r, d.rank, &failure, Clock::now());
    return failed(failure);
  }
  if (!r->Barrier(d.rank, 1, "peer access", deadline, &failure)) {
    site->Break(failure.message);
    Registry::Get().Leave(r, d.rank, Clock::now());
    return failed(failure);
  }
  Registry::Get().Leave(r, d.rank, Clock::now());

  // 3. The schedule on this GPU's stream.
  if (d.steps_count != count) {
    d.steps = cuda::RankSchedule(plan, d.rank, count);
    d.steps_count = count;
  }
  const uint64_t base = d.calls * static_cast<uint64_t>(cuda::BarriersPerCall(plan));
  const int64_t timeout_ns = site->timeout_ms() < 0 ? 0 : site->timeout_ms() * 1000000;
  char* gathered = n == 1 ? outputs[0] : d.out;
  for (const Step& st : d.steps) {
    int rc = 0;
    if (st.kind == Step::Kind::kBarrier) {
      cuda::BarrierArgs a;
      a.k = static_cast<int32_t>(st.ranks.size());
      for (int j = 0; j < a.k; ++j) {
        a.peer_flags[j] = peer_flags[st.ranks[j]];
        a.slot[j] = static_cast<int32_t>(st.ranks[j]);
      }
      a.my_slot = static_cast<int32_t>(d.rank);
      a.my_flags = d.flags;
      a.epoch = base + st.index + 1;
      a.timeout_ns = timeout_ns;
      a.stage = static_cast<uint32_t>(st.index);
      a.error = d.error_dev;
      rc = cuda::LaunchBarrier(a, stream);
    } else if (st.kind == Step::Kind::kPass) {
      cuda::PassArgs a;
      a.k = static_cast<int32_t>(st.ranks.size());
      for (int g = 0; g < a.k; ++g) {
        a.srcs[g] =
            st.pass == cuda::PassKind::kFirst ? peer_in[st.ranks[g]] : peer_acc[st.ranks[g]];
      }
      a.dst = d.acc;
      a.begin = st.range.begin, a.end = st.range.end;
      rc = cuda::LaunchPass(elem, site->op(), st.pass, a, stream, d.sms);
    } else {
      cuda::GatherArgs a;
      a.n = static_cast<int32_t>(ranks);
      for (int64_t o = 0; o < ranks; ++o) {
        a.srcs[o] = peer_acc[o];
        a.begin[o] = st.spans[o].begin, a.end[o] = st.spans[o].end;
      }
      a.dst = gathered;
      rc = cuda::LaunchGather(elem, a, stream, d.sms);
    }
    if (rc != 0) return cuda_error(static_cast<cudaError_t>(rc), "launching a kernel");
  }
  ++d.calls;
  if (n > 1) {  // the gathered result into each output
    for (size_t i = 0; i < n; ++i) {
      const int64_t bytes = (offsets[i + 1] - offsets[i]) * es;
      if (bytes == 0) continue;
      const cudaError_t e = cudaMemcpyAsync(outputs[i], d.out + offsets[i] * es, bytes,
                                            cudaMemcpyDeviceToDevice, stream);
      if (e != cudaSuccess) return cuda_error(e, "copying the result out");
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_TypeId* CudaSiteTypeId() { return &CudaSite::id; }
const XLA_FFI_TypeInfo* CudaSiteTypeInfo() { return &kCudaSiteTypeInfo; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(kAllreduceCudaInstantiate, InstantiateCuda,
                              ffi::Ffi::BindInstantiate()
                                  .Attr<int32_t>("op")
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<int64_t>("timeout_ms")
                                  .Attr<int64_t>("small_bytes")
                                  .Attr<int64_t>("chunk_bytes")
                                  .Attr<ffi::Span<const int64_t>>("device_ranks")
                                  .Attr<int64_t>("module")
                                  .Attr<int64_t>("site")
                                  .Attr<std::string_view>("name"));

// No command-buffer trait: the call meets the other GPUs' threads on the host, so it must
// run every time, never be replayed from a captured CUDA graph.
XLA_FFI_DEFINE_HANDLER_SYMBOL(kAllreduceCuda, AllreduceCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::RunId>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Ctx<ffi::State<CudaSite>>()
                                  .Arg<ffi::AnyBuffer>()  // rank in the reduced axes (int32)
                                  .Arg<ffi::AnyBuffer>()  // group: index over other axes (int32)
                                  .RemainingArgs()
                                  .RemainingRets());

}  // namespace jax_ddl
