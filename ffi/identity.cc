#include "identity.h"

#include <atomic>
#include <cstdio>
#include <map>

#include "topology.h"

namespace jax_ddl {
namespace {
std::atomic<int64_t> g_next_serial{1};

uint64_t Fnv(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}
}  // namespace

SiteIdentity MakeIdentity(int64_t module, int64_t site, std::string_view name) {
  SiteIdentity id;
  id.module = module;
  id.site = site;
  id.module_name = std::string(name);
  id.module_hash = Fnv(name);
  // Lowered modules are told apart by name and number (the n-th of that name).
  const uint64_t lowered = id.module_hash ^ (static_cast<uint64_t>(module) * 0x9e3779b97f4a7c15ull);
  id.copy = NextCopy(static_cast<int64_t>(lowered), site);
  return id;
}

int64_t NextCopy(int64_t module, int64_t site) {
  thread_local int64_t current_module = -1;
  thread_local std::map<int64_t, int64_t> copies;
  if (module != current_module) {
    current_module = module;
    copies.clear();
  }
  return copies[site]++;
}

int64_t NextSiteSerial() { return g_next_serial.fetch_add(1, std::memory_order_relaxed); }

std::string FormatTimeout(int64_t timeout_ms) {
  if (timeout_ms < 0) return "no limit";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g s", timeout_ms / 1000.0);
  return buf;
}

std::string SiteContext(const SiteIdentity& id, const std::vector<int64_t>& dims,
                        int64_t timeout_ms) {
  std::string context = "jax_ddl allreduce (call " + std::to_string(id.site);
  if (id.copy > 0) context += " copy " + std::to_string(id.copy);
  return context + " of " + id.module_name + ", topology " + FormatTopology(dims) + ", timeout " +
         FormatTimeout(timeout_ms) + ")";
}

}  // namespace jax_ddl
