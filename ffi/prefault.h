// Making memory present ahead of its first write (see Prefault).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
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
// meanwhile, and on outputs that alias inputs. A range that is not mapped is skipped; a
// kernel without MADV_POPULATE_WRITE (before 5.14) turns it off for the process.
class Prefault {
 public:
  void Add(const void* p, int64_t bytes) {
    if (bytes <= 0 || !Supported()) return;
    const uintptr_t page = PageSize();
    const uintptr_t at = reinterpret_cast<uintptr_t>(p);
    spans_.push_back({at / page * page, (at + bytes + page - 1) / page * page});
  }
  // Populates up to `bytes` more (whole pages); false once everything is (or nothing can be).
  bool Some(int64_t bytes) {
    while (next_ < spans_.size() && bytes > 0) {
      auto& [begin, end] = spans_[next_];
      const uintptr_t len = std::min<uintptr_t>(
          end - begin, std::max<uintptr_t>(PageSize(), static_cast<uintptr_t>(bytes)));
      if (madvise(reinterpret_cast<void*>(begin), len, MADV_POPULATE_WRITE) != 0 &&
          errno == EINVAL) {
        Unsupported().store(true, std::memory_order_relaxed);
        spans_.clear();
        next_ = 0;
        return false;
      }
      begin += len;
      bytes -= static_cast<int64_t>(len);
      if (begin == end) ++next_;
    }
    return next_ < spans_.size();
  }
  static bool Supported() { return !Unsupported().load(std::memory_order_relaxed); }

 private:
  static uintptr_t PageSize() {
    static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    return page;
  }
  static std::atomic<bool>& Unsupported() {
    static std::atomic<bool> flag{false};
    return flag;
  }
  std::vector<std::pair<uintptr_t, uintptr_t>> spans_;
  size_t next_ = 0;
};

}  // namespace jax_ddl
