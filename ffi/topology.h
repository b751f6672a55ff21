// Topology specs ("4x2") and DDL's multi-dimensional allreduce plan.
// Pure logic shared by every transport: which rank owns which slice of the data after
// each reduce-scatter stage, and which peers it exchanges with. No XLA, MPI or CUDA here.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace jax_ddl {

// A half-open range [begin, end) of element indices.
struct Range {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const Range& o) const { return begin == o.begin && end == o.end; }
};

// Parses "4x2" (also "4X2", "4*2", a single "8") into {4, 2}. Returns false and sets
// *error when the spec is empty, has a non-positive or non-numeric dimension.
bool ParseTopology(std::string_view spec, std::vector<int64_t>* dims, std::string* error);

// "4x2" from {4, 2}.
std::string FormatTopology(const std::vector<int64_t>& dims);

// Part `part` of `parts` balanced parts of `r`: the first (size % parts) parts get one
// extra element, so any size works, including sizes smaller than `parts` and zero.
Range SplitRange(Range r, int64_t parts, int64_t part);

// The DDL plan over a grid of ranks. Rank r has coordinates (c0, c1, ...) with c0 the
// fastest-varying (innermost, fastest link). Stage i reduce-scatters inside the groups of
// dimension i (ranks that differ only in c_i); all-gathers run the stages in reverse.
class Plan {
 public:
  // Returns false and sets *error unless every dimension is >= 1 and the dimensions
  // multiply to `num_ranks`.
  static bool Make(const std::vector<int64_t>& dims, int64_t num_ranks, Plan* plan,
                   std::string* error);

  int64_t num_ranks() const { return num_ranks_; }
  int num_stages() const { return static_cast<int>(dims_.size()); }
  int64_t dim(int stage) const { return dims_[stage]; }
  const std::vector<int64_t>& dims() const { return dims_; }

  // Coordinate of `rank` along dimension `stage`.
  int64_t Coord(int64_t rank, int stage) const { return (rank / stride_[stage]) % dims_[stage]; }
  // The rank that equals `rank` except for coordinate `c` along dimension `stage`.
  int64_t Peer(int64_t rank, int stage, int64_t c) const {
    return rank + (c - Coord(rank, stage)) * stride_[stage];
  }
  // The slice of [0, count) that `rank` is responsible for before stage `level`
  // (level 0: everything; level num_stages(): its final, fully reduced slice).
  Range Region(int64_t rank, int level, int64_t count) const;

 private:
  std::vector<int64_t> dims_;
  std::vector<int64_t> stride_;
  int64_t num_ranks_ = 1;
};

}  // namespace jax_ddl
