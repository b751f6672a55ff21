// A call site's identity, which every process derives from the program alone, shared by
// the CPU and CUDA handlers (docs/design.md, "Call identity"). No XLA, CUDA or MPI here.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace jax_ddl {

// Which call this is, in terms every process derives from the program alone.
struct SiteIdentity {
  int64_t module = 0;        // which lowered module of this name (0, 1, ...) in this process
  int64_t site = 0;          // ordinal of the call in its module's lowering (1, 2, ...)
  int64_t copy = 0;          // instance of a call lowered once and inlined several times
  uint64_t module_hash = 0;  // of the module's name
  std::string module_name;   // "jit_train_step", for messages
};

// The identity of the instruction being instantiated now: module `module` of name `name`,
// call `site` of its lowering, and its copy number (NextCopy).
SiteIdentity MakeIdentity(int64_t module, int64_t site, std::string_view name);

// The instance ordinal of a call lowered once but compiled into several instructions
// (a jitted function called twice): XLA instantiates a program's instructions on the
// compiling thread, in an order fixed by the program, so counting instantiations of
// (module, site) while the thread stays on one lowered module (`module`: its name and
// number) numbers the copies the same way in every process.
int64_t NextCopy(int64_t module, int64_t site);

// A number no other site of this process (CPU or CUDA) ever had: keys its rendezvous.
int64_t NextSiteSerial();

// "3 s", "0.5 s", "no limit".
std::string FormatTimeout(int64_t timeout_ms);

// "jax_ddl allreduce (call 3 of jit_step, topology 2x4, timeout 300 s)", for messages.
std::string SiteContext(const SiteIdentity& id, const std::vector<int64_t>& dims,
                        int64_t timeout_ms);

}  // namespace jax_ddl
