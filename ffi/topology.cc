// Topology parsing and the DDL plan (see topology.h).
#include "topology.h"

#include <cctype>

namespace jax_ddl {

bool ParseTopology(std::string_view spec, std::vector<int64_t>* dims, std::string* error) {
  dims->clear();
  if (spec.empty()) {
    *error = "topology spec is empty; expected dimensions joined by 'x', e.g. \"4x2\"";
    return false;
  }
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t next = spec.find_first_of("xX*", pos);
    if (next == std::string_view::npos) next = spec.size();
    std::string_view field = spec.substr(pos, next - pos);
    while (!field.empty() && std::isspace(static_cast<unsigned char>(field.front()))) {
      field.remove_prefix(1);
    }
    while (!field.empty() && std::isspace(static_cast<unsigned char>(field.back()))) {
      field.remove_suffix(1);
    }
    int64_t value = 0;
    bool ok = !field.empty() && field.size() < 12;
    for (char ch : field) {
      if (!std::isdigit(static_cast<unsigned char>(ch))) ok = false;
      value = value * 10 + (ch - '0');
    }
    if (!ok || value < 1) {
      *error = "topology spec \"" + std::string(spec) + "\" has an invalid dimension \"" +
               std::string(field) + "\"; expected positive integers joined by 'x', e.g. \"4x2\"";
      dims->clear();
      return false;
    }
    dims->push_back(value);
    pos = next + 1;
  }
  return true;
}

std::string FormatTopology(const std::vector<int64_t>& dims) {
  std::string out;
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) out += 'x';
    out += std::to_string(dims[i]);
  }
  return out;
}

Range SplitRange(Range r, int64_t parts, int64_t part) {
  const int64_t n = r.size();
  const int64_t base = n / parts;
  const int64_t extra = n % parts;
  const int64_t begin = r.begin + part * base + (part < extra ? part : extra);
  return Range{begin, begin + base + (part < extra ? 1 : 0)};
}

bool Plan::Make(const std::vector<int64_t>& dims, int64_t num_ranks, Plan* plan,
                std::string* error) {
  if (dims.empty()) {
    *error = "topology has no dimensions";
    return false;
  }
  int64_t product = 1;
  for (int64_t d : dims) {
    if (d < 1) {
      *error = "topology " + FormatTopology(dims) + " has a dimension < 1";
      return false;
    }
    product *= d;
  }
  if (product != num_ranks) {
    *error = "topology " + FormatTopology(dims) + " multiplies to " + std::to_string(product) +
             " but the allreduce spans " + std::to_string(num_ranks) +
             " ranks; its dimensions must multiply to " + std::to_string(num_ranks);
    return false;
  }
  plan->dims_ = dims;
  plan->stride_.assign(dims.size(), 1);
  for (size_t i = 1; i < dims.size(); ++i) plan->stride_[i] = plan->stride_[i - 1] * dims[i - 1];
  plan->num_ranks_ = num_ranks;
  return true;
}

Range Plan::Region(int64_t rank, int level, int64_t count) const {
  Range r{0, count};
  for (int stage = 0; stage < level; ++stage) r = SplitRange(r, dims_[stage], Coord(rank, stage));
  return r;
}

}  // namespace jax_ddl
