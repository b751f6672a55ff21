// What one rank of the CUDA engine enqueues on its stream for one call: the plan's
// reduce-scatter stages, each after a barrier with its group, then a barrier of all ranks,
// the all-gather, and a last barrier after which its staging may be overwritten. Pure host
// code: the handler turns the steps into launches (cuda/launch.h) with real pointers, and
// the host test runs the same steps under many interleavings of the ranks.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "cuda/launch.h"
#include "topology.h"

namespace jax_ddl {
namespace cuda {

struct Step {
  enum class Kind { kBarrier, kPass, kGather };
  Kind kind = Kind::kBarrier;
  // kBarrier: the members (ranks, plan order) and the barrier's index in the call, the
  // same for every member: epoch = call_base + index + 1.
  // kPass: the sources (ranks, plan order), read from their inputs (first stage) or their
  // staging; the destination is the rank's own staging.
  std::vector<int64_t> ranks;
  int64_t index = 0;
  PassKind pass = PassKind::kFirst;
  Range range;
  // kGather: one span per owner rank: its final slice.
  std::vector<Range> spans;
};

// Barriers per call (the epochs a call consumes): one per stage with more than one member,
// one before the gather and one after it.
inline int64_t BarriersPerCall(const Plan& plan) {
  if (plan.num_ranks() == 1) return 0;
  int64_t n = 2;
  for (int s = 0; s < plan.num_stages(); ++s) n += plan.dim(s) > 1;
  return n;
}

// The steps of `rank` for a call of `count` elements. With one rank: a single pass
// (copy, converting 16-bit types through the accumulator) and the gather; no barriers.
inline std::vector<Step> RankSchedule(const Plan& plan, int64_t rank, int64_t count) {
  std::vector<Step> steps;
  int64_t barriers = 0;
  auto barrier = [&](std::vector<int64_t> members) {
    Step b;
    b.kind = Step::Kind::kBarrier;
    b.ranks = std::move(members);
    b.index = barriers++;
    steps.push_back(std::move(b));
  };
  const int64_t ranks = plan.num_ranks();
  const int last = plan.num_stages() - 1;
  bool first = true;
  for (int s = 0; s <= last; ++s) {
    const int64_t k = plan.dim(s);
    if (k == 1 && !(first && s == last)) continue;  // a trivial stage: nothing to reduce
    std::vector<int64_t> group(k);
    for (int64_t g = 0; g < k; ++g) group[g] = plan.Peer(rank, s, g);
    if (k > 1) barrier(group);
    Step p;
    p.kind = Step::Kind::kPass;
    p.ranks = std::move(group);
    p.pass = first ? PassKind::kFirst : PassKind::kMiddle;
    p.range = plan.Region(rank, s + 1, count);
    steps.push_back(std::move(p));
    first = false;
  }
  std::vector<int64_t> all(ranks);
  for (int64_t q = 0; q < ranks; ++q) all[q] = q;
  if (ranks > 1) barrier(all);
  Step g;
  g.kind = Step::Kind::kGather;
  g.ranks = all;
  for (int64_t q = 0; q < ranks; ++q) g.spans.push_back(plan.Region(q, plan.num_stages(), count));
  steps.push_back(std::move(g));
  if (ranks > 1) barrier(all);
  return steps;
}

}  // namespace cuda
}  // namespace jax_ddl
