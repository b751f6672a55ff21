// The nanobind module jax_ddl._ddl: the FFI handler and state-type registrations plus
// small runtime controls (counters, topology parsing, test-only faults). No logic here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "cpu_handler.h"
#if JAX_DDL_HAVE_CUDA
#include "cuda/cuda_handler.h"
#endif
#include "executor.h"
#include "membw.h"
#include "mpi_transport.h"
#include "rendezvous.h"
#include "site.h"
#include "topology.h"

namespace nb = nanobind;

namespace {
const XLA_FFI_TypeInfo kSiteTypeInfo = xla::ffi::MakeTypeInfo<jax_ddl::Site>();

nb::capsule Capsule(const void* p) { return nb::capsule(const_cast<void*>(p)); }
}  // namespace

NB_MODULE(_ddl, m) {
  // {platform: {"instantiate": capsule, "execute": capsule}}
  m.def("registrations", []() {
    nb::dict cpu;
    cpu["instantiate"] = Capsule(reinterpret_cast<void*>(jax_ddl::kAllreduceCpuInstantiate));
    cpu["execute"] = Capsule(reinterpret_cast<void*>(jax_ddl::kAllreduceCpu));
    nb::dict d;
    d["cpu"] = cpu;
#if JAX_DDL_HAVE_CUDA
    nb::dict gpu;
    gpu["instantiate"] = Capsule(reinterpret_cast<void*>(jax_ddl::kAllreduceCudaInstantiate));
    gpu["execute"] = Capsule(reinterpret_cast<void*>(jax_ddl::kAllreduceCuda));
    d["CUDA"] = gpu;
#endif
    return d;
  });
  // The FFI state type of a call site on `platform` (a key of registrations()): must be
  // registered before the handlers.
  m.def(
      "site_type",
      [](const std::string& platform) {
        nb::dict d;
#if JAX_DDL_HAVE_CUDA
        if (platform == "CUDA") {
          d["type_id"] = Capsule(jax_ddl::CudaSiteTypeId());
          d["type_info"] = Capsule(jax_ddl::CudaSiteTypeInfo());
          return d;
        }
#endif
        if (platform != "cpu")
          throw nb::value_error(("no handler for platform " + platform).c_str());
        d["type_id"] = Capsule(&jax_ddl::Site::id);
        d["type_info"] = Capsule(&kSiteTypeInfo);
        return d;
      },
      nb::arg("platform") = "cpu");
  // The gate (an ordering point, see cpu_handler.cc): CPU only; elsewhere it lowers to nothing.
  m.def("gate_cpu", []() { return Capsule(reinterpret_cast<void*>(jax_ddl::kGateCpu)); });
  m.def("parse_topology", [](const std::string& spec) {
    std::vector<int64_t> dims;
    std::string error;
    if (!jax_ddl::ParseTopology(spec, &dims, &error)) throw nb::value_error(error.c_str());
    return dims;
  });
  m.def("counters", []() {
    auto& c = jax_ddl::GetCounters();
    nb::dict d;
    d["calls"] = c.calls.load();
    d["bytes"] = c.bytes.load();
    d["errors"] = c.errors.load();
    d["small_calls"] = c.small_calls.load();
    d["stale_messages"] = c.stale_messages.load();
    d["chunks"] = c.chunks.load();
    d["arrive_s"] = c.arrive_ns.load() * 1e-9;
    d["reduce_scatter_s"] = c.reduce_scatter_ns.load() * 1e-9;
    d["broadcast_s"] = c.broadcast_ns.load() * 1e-9;
    d["small_s"] = c.small_ns.load() * 1e-9;
    d["quiesce_s"] = c.quiesce_ns.load() * 1e-9;
    return d;
  });
  // Resources held now (not reset): call sites of live executables and their scratch bytes,
  // worker threads, requests of failed calls that MPI has not finished.
  m.def("resources", []() {
    nb::dict d;
    d["live_sites"] = jax_ddl::LiveSites();
    d["site_bytes"] = jax_ddl::SiteBytes();
    d["worker_threads"] = jax_ddl::WorkerThreads();
    d["abandoned_requests"] = jax_ddl::MpiAbandonedRequests();
    return d;
  });
  m.def("copy_bandwidth", &jax_ddl::CopyBandwidth, nb::arg("bytes_per_thread"), nb::arg("threads"),
        nb::arg("iters"), nb::call_guard<nb::gil_scoped_release>());
  m.def(
      "reduce_bandwidth",
      [](const std::string& dtype, int64_t bytes_per_thread, int sources, int threads,
         int iters, int destinations) {
        double r = 0;
        {
          nb::gil_scoped_release release;
          r = jax_ddl::ReduceBandwidth(dtype.c_str(), bytes_per_thread, sources, threads, iters,
                                       destinations);
        }
        if (r < 0) throw nb::value_error(("reduce_bandwidth: unknown dtype " + dtype).c_str());
        return r;
      },
      nb::arg("dtype"), nb::arg("bytes_per_thread"), nb::arg("sources"), nb::arg("threads"),
      nb::arg("iters"), nb::arg("destinations") = 1);
  m.def("mpi_compiled_in", &jax_ddl::MpiCompiledIn);
  m.def("mpi_attached", &jax_ddl::MpiAttached);
  m.def(
      "mpi_attach",
      [](const std::vector<int64_t>& comms, int64_t process, int64_t processes) {
        std::string error;
        if (!jax_ddl::MpiAttach(comms, process, processes, &error))
          throw nb::value_error(error.c_str());
      },
      nb::arg("comm_handles"), nb::arg("process"), nb::arg("processes"));
  m.def("reset_counters", []() { jax_ddl::GetCounters().Reset(); });
  // The timeline of calls (jax_ddl.trace): on/off, the events as tuples, the clock.
  m.def("trace_enable", &jax_ddl::TraceEnable, nb::arg("on"), nb::arg("limit") = 1000000);
  m.def("trace_take", []() {
    nb::list out;
    for (const auto& e : jax_ddl::TraceTake()) {
      out.append(nb::make_tuple(e.site, e.rank, e.device, e.bytes, e.start_ns, e.met_ns, e.end_ns,
                                e.ok, e.deferred));
    }
    return out;
  });
  m.def("trace_dropped", &jax_ddl::TraceDropped);
  m.def("trace_now", &jax_ddl::TraceNow);
  m.def(
      "set_fault",
      [](const std::string& kind, int64_t rank, int64_t ms, int64_t count) {
        using jax_ddl::FaultKind;
        FaultKind k;
        if (kind == "none")
          k = FaultKind::kNone;
        else if (kind == "skip")
          k = FaultKind::kSkip;
        else if (kind == "lie")
          k = FaultKind::kLie;
        else if (kind == "delay")
          k = FaultKind::kDelay;
        else if (kind == "stall")
          k = FaultKind::kStall;
        else if (kind == "short")
          k = FaultKind::kShort;
        else if (kind == "hold")
          k = FaultKind::kHold;
        else
          throw nb::value_error(
              "fault kind must be 'none', 'skip', 'lie', 'delay', 'stall', 'short' or 'hold'");
        jax_ddl::SetFault(k, rank, ms, count);
      },
      nb::arg("kind"), nb::arg("rank") = -1, nb::arg("ms") = 0, nb::arg("count") = -1);
  // The "hold" fault: a held call arrives once this is called (or its time ran out).
  m.def("release_hold", &jax_ddl::ReleaseHold);
  m.def("holds", []() {
    nb::dict d;
    d["released"] = jax_ddl::HoldsReleased();
    d["expired"] = jax_ddl::HoldsExpired();
    return d;
  });
}
