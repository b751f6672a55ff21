// Unit tests of the reduction kernels' 16-bit conversions and ops: the branchless,
// vectorisable float16 conversions against plain reference code, exhaustively for
// float16 -> float32 and over a dense sweep of float32 bit patterns for the other way,
// including with denormals flushed (as XLA's threads may run).
#include <cfenv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "check.h"
#include "kernels.h"

using namespace jax_ddl;

// Reference float16 -> float32: the definition, case by case.
static float RefHalfToFloat(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(mant), -24);
  else if (exp == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(1.0f + mant / 1024.0f, exp - 15);
  return sign ? -v : v;
}

// Reference float32 -> float16, round to nearest even, via double arithmetic.
static uint16_t RefFloatToHalf(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return sign | 0x7e00;
  double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7c00;
  if (a < std::ldexp(1.0, -14)) {  // subnormal: multiples of 2^-24
    const double q = std::nearbyint(a * std::ldexp(1.0, 24));  // RNE (default mode)
    return sign | static_cast<uint16_t>(q);
  }
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const double ulp = std::ldexp(1.0, e - 11);
  const double q = std::nearbyint(a / ulp) * ulp;
  int e2;
  const double m2 = std::frexp(q, &e2);
  const int exp = e2 - 1 + 15;
  const int mant = static_cast<int>(std::ldexp(m2, 11)) - 1024;
  return sign | static_cast<uint16_t>((exp << 10) | mant);
}

static bool SameFloat(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return FloatBits(a) == FloatBits(b);
}

static void TestHalfToFloatExhaustive() {
  std::vector<f16_t> halves(65536);
  std::vector<float> floats(65536);
  for (uint32_t h = 0; h < 65536; ++h) halves[h] = f16_t{static_cast<uint16_t>(h)};
  LoadBlock<float>(halves.data(), floats.data(), 65536);  // the block path (F16C if enabled)
  for (uint32_t h = 0; h < 65536; ++h) {
    CHECK(SameFloat(ToFloat(f16_t{static_cast<uint16_t>(h)}), RefHalfToFloat(h)));
    CHECK(SameFloat(floats[h], RefHalfToFloat(h)));
  }
}

static void TestFloatToHalfSweep() {
  std::vector<float> floats;
  for (uint64_t u = 0; u < (1ull << 32); u += 997) {  // ~4.3 million patterns
    floats.push_back(BitsFloat(static_cast<uint32_t>(u)));
  }
  std::vector<f16_t> block(floats.size());
  StoreBlock<f16_t>(floats.data(), block.data(), static_cast<int64_t>(floats.size()));
  for (size_t i = 0; i < floats.size(); ++i) {
    const float f = floats[i];
    const uint16_t want = RefFloatToHalf(f);
    for (uint16_t got : {ToF16(f).bits, block[i].bits}) {
      if (std::isnan(f)) {
        CHECK((got & 0x7c00) == 0x7c00 && (got & 0x3ff) != 0);
      } else {
        CHECK(got == want);
      }
    }
  }
  // Ties and edges: halfway cases round to even, overflow threshold, smallest subnormal.
  for (float f : {65504.0f, 65519.99f, 65520.0f, 1.0009765625f, 1.00048828125f, 1.00146484375f,
                  5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f, 8.940697e-8f, 6.1035156e-5f,
                  6.1035153e-5f, -0.0f, 0.0f, INFINITY, -INFINITY}) {
    CHECK(ToF16(f).bits == RefFloatToHalf(f));
  }
}

static void TestBf16() {
  CHECK(ToBf16(1.0f).bits == 0x3f80);
  CHECK(ToBf16(BitsFloat(0x3f808000u)).bits == 0x3f80);  // tie -> even
  CHECK(ToBf16(BitsFloat(0x3f818000u)).bits == 0x3f82);  // tie -> even (up)
  CHECK(std::isnan(ToFloat(ToBf16(NAN))));
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = ToFloat(bf16_t{static_cast<uint16_t>(h)});
    if (!std::isnan(f)) CHECK(ToBf16(f).bits == h);  // exact round trip
  }
}

static void TestReduceKernel() {
  std::vector<f16_t> a(1000), b(1000), out(1000), out2(1000);
  for (int i = 0; i < 1000; ++i) {
    a[i] = ToF16(i * 0.37f - 100.0f);
    b[i] = ToF16(i * -0.11f + 3.0f);
  }
  const char* srcs[] = {reinterpret_cast<char*>(a.data()), reinterpret_cast<char*>(b.data())};
  char* dsts[] = {reinterpret_cast<char*>(out.data()), reinterpret_cast<char*>(out2.data())};
  ReduceKernel<Op::kSum, float, f16_t, f16_t>(srcs, 2, dsts, 2, 1000);
  for (int i = 0; i < 1000; ++i) {
    const uint16_t want = RefFloatToHalf(RefHalfToFloat(a[i].bits) + RefHalfToFloat(b[i].bits));
    CHECK(out[i].bits == want && out2[i].bits == want);
  }
  std::vector<int32_t> x = {5, -7, INT32_MAX}, y = {-9, 3, 1}, z(3);
  const char* s2[] = {reinterpret_cast<char*>(x.data()), reinterpret_cast<char*>(y.data())};
  char* d2[] = {reinterpret_cast<char*>(z.data())};
  ReduceKernel<Op::kMax, int32_t, int32_t, int32_t>(s2, 2, d2, 1, 3);
  CHECK(z[0] == 5 && z[1] == 3 && z[2] == INT32_MAX);
  ReduceKernel<Op::kSum, int32_t, int32_t, int32_t>(s2, 2, d2, 1, 3);
  CHECK(z[2] == INT32_MIN);  // wraps like XLA
}

static void RunAll() {
  TestHalfToFloatExhaustive();
  TestFloatToHalfSweep();
  TestBf16();
  TestReduceKernel();
}

int main() {
  const bool hardware = UseF16C();
  std::printf("float16 hardware conversions: %s\n", hardware ? "available" : "not available");
  for (bool use : {false, true}) {
    if (use && !hardware) continue;
    UseF16C() = use;
    RunAll();
#if defined(__SSE__)
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // flush-to-zero and denormals-are-zero, as XLA may
    RunAll();
    _mm_setcsr(csr);
#endif
  }
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("kernel tests passed\n");
  return 0;
}
