// Making memory present ahead of its first write (see Prefault).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

namespace jax_ddl {

// Memory a call will write later, made present now, a piece at a time, while its thread
// would otherwise sleep: out of place, XLA's output buffers are often fresh memory (glibc
// maps blocks of 32 MiB and more anew at every allocation), and every page then faults at
// its first write, 1-2 us per 4 KiB page. MADV_POPULATE_WRITE maps pages writable without
// changing what they hold, so it is safe on memory that other threads read or write
// meanwhile, and on outputs that alias inputs. A range the kernel refuses is skipped;
// without MADV_POPULATE_WRITE (kernels before 5.14) nothing is done.
class Prefault {
 public:
  void Add(const void* p, int64_t bytes) {
    if (bytes <= 0 || !Supported()) return;
    const uintptr_t page = PageSize();
    const uintptr_t at = reinterpret_cast<uintptr_t>(p);
    spans_.push_back({at / page * page, (at + bytes + page - 1) / page * page});
  }
  // Populates up to `bytes` more (rounded up to whole pages); false once everything is.
  // A range the kernel refuses (not mapped, not writable) is skipped.
  bool Some(int64_t bytes) {
    const uintptr_t page = PageSize();
    while (next_ < spans_.size() && bytes > 0) {
      auto& [begin, end] = spans_[next_];
      const uintptr_t want = (static_cast<uintptr_t>(bytes) + page - 1) / page * page;
      const uintptr_t len = std::min<uintptr_t>(end - begin, want);
      (void)madvise(reinterpret_cast<void*>(begin), len, MADV_POPULATE_WRITE);
      begin += len;
      bytes -= static_cast<int64_t>(len);
      if (begin == end) ++next_;
    }
    return next_ < spans_.size();
  }
  // Whether the kernel has MADV_POPULATE_WRITE (Linux 5.14), tried once on a page of its own.
  static bool Supported() {
    static const bool supported = [] {
      void* p = mmap(nullptr, PageSize(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
      if (p == MAP_FAILED) return false;
      const bool ok = madvise(p, PageSize(), MADV_POPULATE_WRITE) == 0;
      munmap(p, PageSize());
      return ok;
    }();
    return supported;
  }

 private:
  static uintptr_t PageSize() {
    static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    return page;
  }
  std::vector<std::pair<uintptr_t, uintptr_t>> spans_;
  size_t next_ = 0;
};

}  // namespace jax_ddl
