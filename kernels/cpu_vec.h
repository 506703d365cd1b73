// What the CPU kernels share: one vector register of floats, the blocked dot products, and the rule for
// when a kernel is worth splitting over threads.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace a2ats {

// One vector register of floats: 16 lanes with AVX-512, else 8 (AVX2). A block has one row per lane, so
// that the block's G x lanes accumulators and a query slice fit the 16 or 32 vector registers.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t ivec __attribute__((vector_size(4 * kLanes)));

constexpr int64_t kBlock = kLanes;  // rows scored together (block_dots: one per lane)

// Work (in multiply-adds, or the equivalent) below which a kernel runs on the calling thread. Waking
// ATen's OpenMP team costs microseconds on an idle machine and up to a scheduler slice when another
// process holds a core (a team waits for its slowest thread), while a decode layer at batch 1 is a few
// hundred microseconds of work in all: ~2M multiply-adds is about 100-200 us on one core.
constexpr int64_t kSerialWork = int64_t{1} << 21;

// at::parallel_for over items of `item_work` each: the grain that keeps every task above kSerialWork, so a
// small call runs inline and a large one uses only as many threads as it can keep busy.
inline int64_t grain(int64_t item_work) { return std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, item_work)); }

inline vec loadv(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Dot products of one row k with the G rows of q (each D long), written to s[g * stride] (the path for a
// head dim that is not a multiple of the lanes).
inline void dots(const float* __restrict q, const float* __restrict k, int64_t G, int64_t D, float* s, int64_t stride) {
  for (int64_t g = 0; g < G; ++g) s[g * stride] = dot(q + g * D, k, D);
}

// Horizontal sums of kLanes vectors at once: lane r of the result is the sum of p[r]'s lanes, by levels of
// pairwise "transpose and add" (kLanes - 1 shuffle pairs instead of kLanes reductions).
inline vec hsum_block(vec* p) {
#if defined(__AVX512F__)
  vec c[8], e[4], f[2];
  for (int j = 0; j < 8; ++j)
    c[j] = __builtin_shufflevector(p[2 * j], p[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(p[2 * j], p[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)
    e[j] = __builtin_shufflevector(c[2 * j], c[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * j], c[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)
    f[j] = __builtin_shufflevector(e[2 * j], e[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(e[2 * j], e[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(f[0], f[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(f[0], f[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  vec e[4], f[2];
  for (int j = 0; j < 4; ++j)
    e[j] = __builtin_shufflevector(p[2 * j], p[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(p[2 * j], p[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int j = 0; j < 2; ++j)
    f[j] = __builtin_shufflevector(e[2 * j], e[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(e[2 * j], e[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(f[0], f[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(f[0], f[1], 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}

// Dot products of a block: s[g * stride + r] = q_g . k_r for the G rows of q (each D long, D % kLanes == 0)
// and the kBlock rows k[r]; stride >= kBlock.
inline void block_dots(const float* __restrict q, const float* const* k, int64_t G, int64_t D, float* s,
                       int64_t stride = kBlock) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    vec p[kBlock];
    for (int r = 0; r < kBlock; ++r) p[r] = vec{};
    for (int64_t d = 0; d < D; d += kLanes) {
      const vec qd = loadv(qg + d);
      for (int r = 0; r < kBlock; ++r) p[r] += qd * loadv(k[r] + d);
    }
    const vec out = hsum_block(p);
    std::memcpy(s + g * stride, &out, sizeof(out));
  }
}

// s[g * stride + c] = q_g . w_c for the G rows of q and the C rows of w (each D long, contiguous): blocks
// of kBlock rows of w through block_dots, the rest (and any D off the lanes) by single dot products.
inline void row_dots(const float* __restrict q, const float* __restrict w, int64_t G, int64_t C, int64_t D, float* s,
                     int64_t stride) {
  int64_t c0 = 0;
  if (D % kLanes == 0) {
    const float* rows[kBlock];
    for (; c0 + kBlock <= C; c0 += kBlock) {
      for (int r = 0; r < kBlock; ++r) rows[r] = w + (c0 + r) * D;
      block_dots(q, rows, G, D, s + c0, stride);
    }
  }
  for (int64_t c = c0; c < C; ++c) dots(q, w + c * D, G, D, s + c, stride);
}

}  // namespace a2ats
