// Unit tests of the topology parser and the DDL plan, including a simulation of the
// whole reduce-scatter / all-gather schedule on integer data checked against a plain sum.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "check.h"
#include "topology.h"

using jax_ddl::Plan;
using jax_ddl::Range;

static void TestParse() {
  std::vector<int64_t> dims;
  std::string err;
  CHECK(jax_ddl::ParseTopology("4x2", &dims, &err) && dims == std::vector<int64_t>({4, 2}));
  CHECK(jax_ddl::ParseTopology("8", &dims, &err) && dims == std::vector<int64_t>({8}));
  CHECK(jax_ddl::ParseTopology("2X2*2", &dims, &err) && dims == std::vector<int64_t>({2, 2, 2}));
  CHECK(jax_ddl::ParseTopology(" 2 x 3 ", &dims, &err) && dims == std::vector<int64_t>({2, 3}));
  for (const char* bad : {"", "x", "4x", "0x2", "a", "4x-1", "2xx2", "99999999999999"}) {
    err.clear();
    CHECK(!jax_ddl::ParseTopology(bad, &dims, &err));
    CHECK(!err.empty());
  }
  CHECK(jax_ddl::FormatTopology({4, 2, 1}) == "4x2x1");
}

static void TestSplit() {
  for (int64_t n = 0; n < 40; ++n) {
    for (int64_t p = 1; p < 10; ++p) {
      int64_t next = 5;
      int64_t biggest = 0, smallest = n + 1;
      for (int64_t j = 0; j < p; ++j) {
        Range r = jax_ddl::SplitRange(Range{5, 5 + n}, p, j);
        CHECK(r.begin == next);
        next = r.end;
        biggest = std::max(biggest, r.size());
        smallest = std::min(smallest, r.size());
      }
      CHECK(next == 5 + n);
      CHECK(biggest - smallest <= 1);
    }
  }
}

static void TestPlanErrors() {
  Plan plan;
  std::string err;
  CHECK(!Plan::Make({4, 3}, 8, &plan, &err));
  CHECK(err.find("multiplies to 12") != std::string::npos);
  CHECK(err.find("must multiply to 8") != std::string::npos);
  CHECK(!Plan::Make({}, 1, &plan, &err));
  CHECK(Plan::Make({2, 4}, 8, &plan, &err));
}

// Runs the plan on integer data: rank r holds value (r + 1) * 1000 + e at element e.
static void SimulateAllreduce(const std::vector<int64_t>& dims, int64_t count) {
  int64_t ranks = 1;
  for (int64_t d : dims) ranks *= d;
  Plan plan;
  std::string err;
  CHECK(Plan::Make(dims, ranks, &plan, &err));
  std::vector<std::vector<int64_t>> buf(ranks, std::vector<int64_t>(count));
  for (int64_t r = 0; r < ranks; ++r)
    for (int64_t e = 0; e < count; ++e) buf[r][e] = (r + 1) * 1000 + e;
  // Reduce-scatter stage by stage: each rank sums its next region over its group.
  for (int s = 0; s < plan.num_stages(); ++s) {
    auto next = buf;
    for (int64_t r = 0; r < ranks; ++r) {
      Range mine = plan.Region(r, s + 1, count);
      CHECK(mine.begin >= plan.Region(r, s, count).begin);
      CHECK(mine.end <= plan.Region(r, s, count).end);
      for (int64_t e = mine.begin; e < mine.end; ++e) {
        int64_t acc = 0;
        for (int64_t c = 0; c < plan.dim(s); ++c) {
          int64_t peer = plan.Peer(r, s, c);
          CHECK(plan.Region(peer, s, count) == plan.Region(r, s, count));
          acc += buf[peer][e];
        }
        next[r][e] = acc;
      }
    }
    buf = next;
  }
  // Final regions partition [0, count).
  std::vector<int> owners(count, 0);
  for (int64_t r = 0; r < ranks; ++r) {
    Range fin = plan.Region(r, plan.num_stages(), count);
    for (int64_t e = fin.begin; e < fin.end; ++e) owners[e]++;
  }
  for (int64_t e = 0; e < count; ++e) CHECK(owners[e] == 1);
  // All-gather in reverse: copy the peers' regions of the next level.
  for (int s = plan.num_stages() - 1; s >= 0; --s) {
    auto next = buf;
    for (int64_t r = 0; r < ranks; ++r) {
      for (int64_t c = 0; c < plan.dim(s); ++c) {
        int64_t peer = plan.Peer(r, s, c);
        Range theirs = plan.Region(peer, s + 1, count);
        for (int64_t e = theirs.begin; e < theirs.end; ++e) next[r][e] = buf[peer][e];
      }
    }
    buf = next;
  }
  const int64_t rank_sum = ranks * (ranks + 1) / 2;
  for (int64_t r = 0; r < ranks; ++r)
    for (int64_t e = 0; e < count; ++e) CHECK(buf[r][e] == rank_sum * 1000 + ranks * e);
}

static void TestCoords() {
  Plan plan;
  std::string err;
  CHECK(Plan::Make({4, 2}, 8, &plan, &err));
  CHECK(plan.Coord(5, 0) == 1 && plan.Coord(5, 1) == 1);
  CHECK(plan.Peer(5, 0, 3) == 7 && plan.Peer(5, 1, 0) == 1);
}

int main() {
  TestParse();
  TestSplit();
  TestPlanErrors();
  TestCoords();
  const std::vector<std::vector<int64_t>> grids = {{1}, {8}, {2, 4}, {4, 2}, {2, 2, 2}, {3},
                                                   {3, 1, 2}, {1, 5}, {2, 3, 2}};
  for (const auto& dims : grids)
    for (int64_t count : {0, 1, 2, 7, 8, 9, 31, 100}) SimulateAllreduce(dims, count);
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("plan tests passed\n");
  return 0;
}
