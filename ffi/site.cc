// Call-site state and identity (see site.h).
#include "site.h"

#include <cstdio>
#include <utility>

#include "mpi_transport.h"

namespace jax_ddl {
namespace {
std::atomic<int64_t> g_live_sites{0};
std::atomic<int64_t> g_site_bytes{0};

int64_t Held(const std::vector<char>& buf) { return static_cast<int64_t>(buf.capacity()); }
}  // namespace

char* DeviceSite::Grow(std::vector<char>* buf, size_t bytes) {
  const int64_t before = Held(*buf);
  if (buf->size() < bytes) buf->resize(bytes);
  g_site_bytes.fetch_add(Held(*buf) - before, std::memory_order_relaxed);
  return buf->data();
}

void DeviceSite::ReleaseMpi(std::vector<std::vector<char>>* to) {
  int64_t held = 0;
  for (const auto& b : mpi) held += Held(b);
  g_site_bytes.fetch_sub(held, std::memory_order_relaxed);
  to->swap(mpi);
  mpi.clear();
}

DeviceSite::~DeviceSite() {
  int64_t held = Held(staging[0]) + Held(staging[1]) + Held(inter) + Held(accum);
  for (const auto& b : mpi) held += Held(b);
  g_site_bytes.fetch_sub(held, std::memory_order_relaxed);
}

int64_t SiteBytes() { return g_site_bytes.load(std::memory_order_relaxed); }

xla::ffi::TypeId Site::id = {};

Site::Site(SiteIdentity identity, Op op, std::vector<int64_t> dims, int64_t timeout_ms,
           int64_t small_bytes, int64_t chunk_bytes, std::vector<int64_t> device_ranks)
    : identity_(std::move(identity)),
      serial_(NextSiteSerial()),
      op_(op),
      dims_(std::move(dims)),
      timeout_ms_(timeout_ms),
      small_bytes_(small_bytes),
      chunk_bytes_(chunk_bytes),
      device_ranks_(std::move(device_ranks)) {
  g_live_sites.fetch_add(1, std::memory_order_relaxed);
}

Site::~Site() { g_live_sites.fetch_sub(1, std::memory_order_relaxed); }

bool Site::RanksOf(int64_t device, int64_t* rank, int64_t* group) const {
  for (size_t i = 0; i + 2 < device_ranks_.size(); i += 3) {
    if (device_ranks_[i] == device) {
      *rank = device_ranks_[i + 1];
      *group = device_ranks_[i + 2];
      return true;
    }
  }
  return false;
}

int64_t LiveSites() { return g_live_sites.load(std::memory_order_relaxed); }

bool Site::Prepare(std::string* error) {
  if (prepared_.load(std::memory_order_acquire)) return true;
  std::lock_guard<std::mutex> lock(mu_);
  if (prepared_.load(std::memory_order_relaxed)) return true;
  int64_t ranks = 1;
  for (int64_t d : dims_) ranks *= d;
  if (!Plan::Make(dims_, ranks, &plan_, error)) return false;
  mode_ = Mode::kLocal;
  const ProcessLayout& pl = MpiLayout();
  if (MpiAttached() && pl.processes > 1 && ranks == pl.slots * pl.processes) {
    // DDL's hierarchy when the grid splits at the process boundary: leading dimensions
    // that multiply to the local devices (shared memory), the rest over processes (MPI).
    std::vector<int64_t> local_dims, proc_dims;
    int64_t prod = 1;
    size_t i = 0;
    for (; i < dims_.size() && prod < pl.slots; ++i) {
      prod *= dims_[i];
      local_dims.push_back(dims_[i]);
    }
    proc_dims.assign(dims_.begin() + i, dims_.end());
    if (prod == pl.slots) {
      if (local_dims.empty()) local_dims.push_back(1);
      if (proc_dims.empty()) proc_dims.push_back(1);
      Plan::Make(local_dims, pl.slots, &local_plan_, error);
      Plan::Make(proc_dims, pl.processes, &proc_plan_, error);
      mode_ = Mode::kAcross;
    } else {
      mode_ = Mode::kSpanning;  // e.g. a flat spec over the devices of several processes
    }
  }
  context_ = SiteContext(identity_, dims_, timeout_ms_);
  prepared_.store(true, std::memory_order_release);
  return true;
}

DeviceSite& Site::device(int64_t device) {
  std::lock_guard<std::mutex> lock(mu_);
  if (device >= static_cast<int64_t>(devices_.size())) devices_.resize(device + 1);
  if (!devices_[device]) devices_[device] = std::make_unique<DeviceSite>();
  return *devices_[device];
}

}  // namespace jax_ddl
