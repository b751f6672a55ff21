// One jax_ddl call site of one compiled program: the FFI state XLA creates for each
// custom-call instruction when it compiles a program (instantiate stage) and destroys
// with the executable. It carries the call's identity (which every process agrees on)
// and the per-device scratch, so no memory outlives the program that used it.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "identity.h"
#include "kernels.h"
#include "topology.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ddl {

// How a site's plan maps onto processes (decided at its first execution).
enum class Mode : int32_t {
  kLocal = 0,     // every rank in this process: shared memory only
  kAcross = 1,    // DDL's hierarchy: local stages, then the process stages over MPI
  kSpanning = 2,  // groups span processes: the whole plan stage by stage, MPI for remote peers
};

// Per device of one site: what one call on that device uses. Calls of one site on one
// device never overlap (XLA runs a device's executions one after another, and a loop
// runs its body's calls one iteration after another); `busy` enforces it.
struct DeviceSite {
  DeviceSite() = default;
  ~DeviceSite();
  DeviceSite(const DeviceSite&) = delete;
  DeviceSite& operator=(const DeviceSite&) = delete;

  // Grows `buf` (one of the scratch buffers below) to at least `bytes`, keeping the
  // process-wide count of scratch bytes (SiteBytes) in step. Returns its data.
  char* Grow(std::vector<char>* buf, size_t bytes);
  // Hands the MPI buffers over (to the transport, after a failed call), uncounting them.
  void ReleaseMpi(std::vector<std::vector<char>>* to);

  std::atomic<bool> busy{false};
  int64_t last_run_id = 0;
  bool seen_run = false;
  int64_t occurrence = 0;  // executions of this site within the current run
  uint64_t completed = 0;  // successful small-path calls; picks the staging half
  std::chrono::steady_clock::time_point met{};  // when the current call saw every rank arrive (for the trace)
  std::vector<char*> inputs, outputs;
  std::vector<int64_t> offsets;  // prefix sums of the buffers' element counts
  std::vector<char> staging[2];
  std::vector<char> inter;
  std::vector<char> accum;
  std::vector<const char*> peer_ptrs;
  std::vector<char*> dst_ptrs;
  // Buffers that cross-process messages are sent from and received into. Always owned
  // here, never XLA's: after a failed call the transport may keep them (MPI cannot
  // cancel a send) until every request on them has completed.
  std::vector<std::vector<char>> mpi;
};

class Site {
 public:
  static xla::ffi::TypeId id;

  Site(SiteIdentity identity, Op op, std::vector<int64_t> dims, int64_t timeout_ms,
       int64_t small_bytes, int64_t chunk_bytes, std::vector<int64_t> device_ranks);
  ~Site();
  Site(const Site&) = delete;
  Site& operator=(const Site&) = delete;

  const SiteIdentity& identity() const { return identity_; }
  // Unique among every site this process ever created (keys its rendezvous: an address
  // could be reused by a later site).
  int64_t serial() const { return serial_; }
  Op op() const { return op_; }
  const std::vector<int64_t>& dims() const { return dims_; }
  int64_t timeout_ms() const { return timeout_ms_; }  // < 0: no limit
  int64_t small_bytes() const { return small_bytes_; }
  // Across processes: bytes (of one device's buffer) per pipeline chunk; 0: one chunk.
  int64_t chunk_bytes() const { return chunk_bytes_; }
  // Whether the program carries each device's rank and group (then its rank operands are
  // placeholders), and the ones of `device` (a device id as XLA's CPU runtime passes it):
  // false when the table does not list it.
  bool has_device_ranks() const { return !device_ranks_.empty(); }
  bool RanksOf(int64_t device, int64_t* rank, int64_t* group) const;

  // The plan and its mapping onto processes, made on first use (the MPI transport may be
  // attached after compilation). Returns false with *error if the topology is invalid.
  bool Prepare(std::string* error);
  const Plan& plan() const { return plan_; }
  Mode mode() const { return mode_; }
  const Plan& local_plan() const { return local_plan_; }
  const Plan& proc_plan() const { return proc_plan_; }
  const std::string& context() const { return context_; }

  // The state of this site on `device`, created on first use.
  DeviceSite& device(int64_t device);

 private:
  SiteIdentity identity_;
  int64_t serial_;
  Op op_;
  std::vector<int64_t> dims_;
  int64_t timeout_ms_;
  int64_t small_bytes_;
  int64_t chunk_bytes_;
  std::vector<int64_t> device_ranks_;  // (device id, rank, group) triples

  std::mutex mu_;
  std::atomic<bool> prepared_{false};
  Plan plan_, local_plan_, proc_plan_;
  Mode mode_ = Mode::kLocal;
  std::string context_;  // "jax_ddl allreduce (call 3 of jit_step, topology 2x4, timeout 300 s)"
  std::vector<std::unique_ptr<DeviceSite>> devices_;
};

// Live sites in this process (to check that memory follows the executables' lifetime).
int64_t LiveSites();
// Bytes of scratch (staging, intermediates, message frames) held by the live sites.
int64_t SiteBytes();

}  // namespace jax_ddl
