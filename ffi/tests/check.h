// The CPU tests' CHECK: prints the first 20 failures and counts them all in `failures`
// (each test's main returns non-zero when it is not zero).
#pragma once

#include <cstdio>

static int failures = 0;
#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      if (failures < 20) {                                                            \
        std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      }                                                                               \
      ++failures;                                                                     \
    }                                                                                 \
  } while (0)
