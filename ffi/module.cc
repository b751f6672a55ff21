// The nanobind module jax_ddl._ddl: the FFI handler registrations plus small runtime
// controls (counters, topology parsing, test-only fault injection). No logic lives here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "cpu_handler.h"
#include "membw.h"
#include "mpi_transport.h"
#include "rendezvous.h"
#include "topology.h"

namespace nb = nanobind;

NB_MODULE(_ddl, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["cpu"] = nb::capsule(reinterpret_cast<void*>(jax_ddl::kAllreduceCpu));
    return d;
  });
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
    d["arrive_s"] = c.arrive_ns.load() * 1e-9;
    d["reduce_scatter_s"] = c.reduce_scatter_ns.load() * 1e-9;
    d["broadcast_s"] = c.broadcast_ns.load() * 1e-9;
    d["small_s"] = c.small_ns.load() * 1e-9;
    return d;
  });
  m.def("copy_bandwidth", &jax_ddl::CopyBandwidth, nb::arg("bytes_per_thread"),
        nb::arg("threads"), nb::arg("iters"), nb::call_guard<nb::gil_scoped_release>());
  m.def("mpi_compiled_in", &jax_ddl::MpiCompiledIn);
  m.def("mpi_attached", &jax_ddl::MpiAttached);
  m.def("mpi_attach", [](const std::vector<int64_t>& comms, int64_t process, int64_t processes) {
    std::string error;
    if (!jax_ddl::MpiAttach(comms, process, processes, &error)) throw nb::value_error(error.c_str());
  }, nb::arg("comm_handles"), nb::arg("process"), nb::arg("processes"));
  m.def("reset_counters", []() { jax_ddl::GetCounters().Reset(); });
  m.def("set_fault", [](const std::string& kind, int64_t rank) {
    auto& f = jax_ddl::GetFault();
    if (kind == "none") {
      f.kind = 0;
    } else if (kind == "skip") {
      f.kind = static_cast<int>(jax_ddl::FaultKind::kSkip);
    } else if (kind == "lie") {
      f.kind = static_cast<int>(jax_ddl::FaultKind::kLie);
    } else {
      throw nb::value_error("fault kind must be 'none', 'skip' or 'lie'");
    }
    f.rank = rank;
  });
}
