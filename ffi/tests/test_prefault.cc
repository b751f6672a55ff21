// Prefault: every page of the ranges it was given becomes present and writable (writing
// it then takes no page fault), what the pages hold is left as it was, and ranges that
// are not mapped are skipped.
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "check.h"
#include "prefault.h"

static const long kPage = sysconf(_SC_PAGESIZE);

// Pages of [p, p + pages * kPage) that are present.
static int Resident(char* p, int pages) {
  std::vector<unsigned char> v(pages);
  if (mincore(p, pages * kPage, v.data()) != 0) return -1;
  int n = 0;
  for (unsigned char b : v) n += b & 1;
  return n;
}

static long MinorFaults() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

// Page faults taken while writing one byte into each page of [p, p + pages * kPage)
// (writing what the byte already holds, so contents stay as they were).
static long FaultsWriting(char* p, int pages) {
  const long before = MinorFaults();
  for (int i = 0; i < pages; ++i) {
    volatile char* b = p + i * kPage + 1;
    *b = *b;
  }
  return MinorFaults() - before;
}

int main() {
  if (!jax_ddl::Prefault::Supported()) return 77;  // a kernel before 5.14: nothing to test
  const int pages = 64;
  char* p = static_cast<char*>(
      mmap(nullptr, pages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "mmap failed\n");
    return 1;
  }
  madvise(p, pages * kPage, MADV_NOHUGEPAGE);  // page by page, whatever the system's default
  // A hole: the third quarter is unmapped, as if a span ran past its buffer.
  CHECK(munmap(p + 32 * kPage, 16 * kPage) == 0);
  std::memset(p + 5 * kPage + 7, 0x5a, 100);  // data that must survive
  CHECK(Resident(p, 32) == 1);

  jax_ddl::Prefault pf;
  pf.Add(p + 10, 20 * kPage);                  // pages 0-20 (unaligned start and end)
  pf.Add(p + 30 * kPage, 4 * kPage);           // pages 30-31, then into the hole
  pf.Add(p + 50 * kPage + 1, 10 * kPage - 2);  // pages 50-59
  int calls = 0;
  while (pf.Some(3 * kPage - 100)) ++calls;  // a piece that is not whole pages
  CHECK(calls >= 10);                        // a few pages per call, not all at once
  CHECK(Resident(p, 21) == 21);
  CHECK(Resident(p + 21 * kPage, 9) == 0);  // only what was asked for
  CHECK(Resident(p + 30 * kPage, 2) == 2);
  CHECK(Resident(p + 50 * kPage, 10) == 10);
  CHECK(Resident(p + 60 * kPage, 4) == 0);
  // Present and writable: writing them takes (almost) no fault; a page never prefaulted
  // takes one each (checked on pages 21-29, so the count is known to work).
  CHECK(FaultsWriting(p, 21) <= 2);
  CHECK(FaultsWriting(p + 50 * kPage, 10) <= 2);
  CHECK(FaultsWriting(p + 21 * kPage, 9) >= 9);
  for (int i = 0; i < pages * kPage; ++i) {
    if (i >= 32 * kPage && i < 48 * kPage) continue;
    const bool ours = i >= 5 * kPage + 7 && i < 5 * kPage + 107;
    if (p[i] != (ours ? 0x5a : 0)) {
      CHECK(p[i] == (ours ? 0x5a : 0));
      break;
    }
  }
  CHECK(!pf.Some(kPage));  // nothing left
  if (failures) std::fprintf(stderr, "%d failures\n", failures);
  return failures ? 1 : 0;
}
