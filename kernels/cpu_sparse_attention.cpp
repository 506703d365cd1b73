// CPU sparse decode attention over per-KV-head lists of selected slots.
//
// Work is split into (request, KV head, chunk of selected rows) items so every core is
// busy even at batch 1; each item streams its rows in blocks of one row per vector lane (8
// with AVX2, 16 with AVX-512): the g query heads of the group score a block of K rows (the
// rows' sums reduced together by a transpose-and-add network), update their running max
// and sum once per block (weights by a vector exp), then
// accumulate the block's V rows with each slice of the output held in a register over
// the block. Rows are scattered in the
// pool, so the next block's K and V rows (every cache line of them) are prefetched
// while the current one is computed. Partial results of the chunks merge by
// log-sum-exp. Parallel with ATen's thread pool.
#include "cpu_kernels.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using namespace a2ats;

constexpr int64_t kChunk = 256;     // rows per work item
constexpr int64_t kLine = 64;       // cache line bytes

inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  if (n % kLanes == 0) {
    for (int64_t i = 0; i < n; i += kLanes) {
      const vec r = loadv(y + i) + a * loadv(x + i);
      std::memcpy(y + i, &r, sizeof(r));
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// exp of every lane (float32; Cephes' polynomial on the reduced argument, ~2 ulp; exp(-inf) = 0): the
// softmax weights of a block in a few vector instructions instead of one libm call each.
inline vec vexp(vec x) {
  const vec hi = x > 88.3762626647949f ? vec{} + 88.3762626647949f : x;
  x = x < -88.3762626647949f ? vec{} - 88.3762626647949f : hi;
  vec fx = x * 1.44269504088896341f + 0.5f;
  const ivec n0 = __builtin_convertvector(fx, ivec);
  vec n = __builtin_convertvector(n0, vec);
  n = n > fx ? n - 1.f : n;  // floor
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const vec z = x * x;
  vec y = vec{} + 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// y[0:n) += sum_r p[r] * x[r][0:n): each slice of y stays in a register over the rows.
inline void accumulate(float* __restrict y, const float* p, const float* const* x, int64_t rows, int64_t n) {
  if (n % kLanes == 0) {
    for (int64_t i = 0; i < n; i += kLanes) {
      vec a = loadv(y + i);
      for (int64_t r = 0; r < rows; ++r) a += p[r] * loadv(x[r] + i);
      std::memcpy(y + i, &a, sizeof(a));
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) axpy(y, p[r], x[r], n);
}

inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += kLine) __builtin_prefetch(c + o, 0, 1);
}

// A row as float: the row itself for float storage, else converted into `buf`.
template <typename T>
inline const float* as_float(const T* p, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return buf;
  }
}

template <typename T>
void attend(const float* q, const T* k, const T* v, const int64_t* slots, int64_t ssb, int64_t ssh,
            const int64_t* extent, float* out, float* lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D,
            int64_t Dv, int64_t ksn, int64_t ksh, int64_t vsn, int64_t vsh, float scale, float cap) {
  const int64_t G = Hq / Hkv;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (extent != nullptr) {  // rows past every request's extent are never read: size the chunks by the longest
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = std::max(longest, std::min(S, extent[b]));
    S = longest;
  }
  const int64_t chunks = std::max<int64_t>(1, (S + kChunk - 1) / kChunk);
  const int64_t part = G * (Dv + 2);  // per chunk: acc [G, Dv], max [G], sum [G]
  thread_local std::vector<float> scratch;  // the chunks' partial results, kept between calls (no allocation per layer)
  if (scratch.size() < static_cast<size_t>(B * Hkv * chunks * part)) scratch.resize(B * Hkv * chunks * part);
  float* const parts = scratch.data();

  at::parallel_for(0, B * Hkv * chunks, grain(kChunk * G * (D + Dv)), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> qs, s, kbuf, vbuf, zeros;  // this thread's working rows, kept between calls
    qs.resize(G * D), s.resize(G * kBlock), kbuf.resize(kBlock * D), vbuf.resize(kBlock * Dv), zeros.assign(D, 0.f);
    const float* krow[kBlock];
    const T* vrow[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / chunks, c = item % chunks, b = bh / Hkv, h = bh % Hkv;
      float* acc = parts + item * part;
      float* m = acc + G * Dv;
      float* l = m + G;
      std::fill(acc, acc + G * Dv, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qs[g * D + d] = qg[d] * scale;
        m[g] = neg_inf;
        l[g] = 0.f;
      }
      const int64_t* sl = slots + b * ssb + h * ssh;
      const int64_t j_end = std::min(extent != nullptr ? std::min(S, extent[b]) : S, (c + 1) * kChunk);
      for (int64_t j0 = c * kChunk; j0 < j_end; j0 += kBlock) {
        const int64_t j1 = std::min(j_end, j0 + kBlock);
        for (int64_t j = j1; j < std::min(j_end, j1 + kBlock); ++j) {  // the next block, while this one computes
          if (sl[j] < 0) continue;
          prefetch_row(k + sl[j] * ksn + h * ksh, D * sizeof(T));
          prefetch_row(v + sl[j] * vsn + h * vsh, Dv * sizeof(T));
        }
        int64_t n = 0;
        for (int64_t j = j0; j < j1; ++j) {
          if (sl[j] < 0) continue;
          krow[n] = as_float(k + sl[j] * ksn + h * ksh, kbuf.data() + n * D, D);
          vrow[n] = v + sl[j] * vsn + h * vsh;
          ++n;
        }
        if (n == 0) continue;
        if (D % kLanes == 0) {  // a whole block at once; rows past n read zeros and are not used
          for (int64_t r = n; r < kBlock; ++r) krow[r] = zeros.data();
          block_dots(qs.data(), krow, G, D, s.data());
        } else {
          for (int64_t r = 0; r < n; ++r) dots(qs.data(), krow[r], G, D, s.data() + r, kBlock);
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = s.data() + g * kBlock;
          float bmax = neg_inf;
          for (int64_t r = 0; r < n; ++r) {
            if (cap > 0.f) sg[r] = cap * std::tanh(sg[r] / cap);
            bmax = std::max(bmax, sg[r]);
          }
          const float m_new = std::max(m[g], bmax);
          if (m_new > m[g]) {  // rescale what was accumulated (nothing yet on the first block)
            const float alpha = std::exp(m[g] - m_new);
            l[g] *= alpha;
            for (int64_t d = 0; d < Dv; ++d) acc[g * Dv + d] *= alpha;
            m[g] = m_new;
          }
          for (int64_t r = n; r < kBlock; ++r) sg[r] = neg_inf;  // rows past n weigh 0
          const vec w = vexp(loadv(sg) - m_new);
          std::memcpy(sg, &w, sizeof(w));
          for (int64_t r = 0; r < n; ++r) l[g] += sg[r];
        }
        const float* vr[kBlock];
        for (int64_t r = 0; r < n; ++r) vr[r] = as_float(vrow[r], vbuf.data() + r * Dv, Dv);
        for (int64_t g = 0; g < G; ++g) accumulate(acc + g * Dv, s.data() + g * kBlock, vr, n, Dv);
      }
    }
  });

  // Merge the chunks of each (request, KV head) by log-sum-exp.
  at::parallel_for(0, B * Hkv, grain(chunks * G * Dv), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      for (int64_t g = 0; g < G; ++g) {
        float mx = neg_inf;
        for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, parts[(bh * chunks + c) * part + G * Dv + g]);
        float* og = out + (b * Hq + h * G + g) * Dv;
        std::fill(og, og + Dv, 0.f);
        float total = 0.f;
        if (mx > neg_inf) {
          for (int64_t c = 0; c < chunks; ++c) {
            const float* p = parts + (bh * chunks + c) * part;
            const float w = std::exp(p[G * Dv + g] - mx);  // 0 for an empty chunk (max = -inf)
            if (w == 0.f) continue;
            total += w * p[G * Dv + G + g];
            axpy(og, w, p + g * Dv, Dv);
          }
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int64_t d = 0; d < Dv; ++d) og[d] *= inv;
        lse[b * Hq + h * G + g] = total > 0.f ? mx + std::log(total) : neg_inf;
      }
    }
  });
}

}  // namespace

namespace {

// The checks and dispatch both entry points share: slots' rows at strides (ssb per request, ssh per KV head),
// extent (nullable) the rows of each request to read.
void attend_checked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& slots,
                    int64_t ssb, int64_t ssh, int64_t S, const int64_t* extent, double scale, double cap,
                    torch::Tensor& out, torch::Tensor& lse) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "expected 3-d q, k, v");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && slots.scalar_type() == torch::kLong, "q must be f32, slots i64");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v dtypes differ");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k/v last dim must be contiguous");
  TORCH_CHECK(q.is_contiguous() && slots.is_contiguous(), "q and slots must be contiguous");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), Dv = v.size(2);
  TORCH_CHECK(k.size(2) == D && slots.size(0) == B && Hq % Hkv == 0, "shape mismatch");
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.is_contiguous() && out.numel() == B * Hq * Dv,
              "out must be contiguous f32 [B, Hq, Dv]");
  TORCH_CHECK(lse.scalar_type() == torch::kFloat && lse.is_contiguous() && lse.numel() == B * Hq,
              "lse must be contiguous f32 [B, Hq]");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "a2ats_sparse_attention", [&] {
    attend<scalar_t>(q.data_ptr<float>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
                     ssb, ssh, extent, out.data_ptr<float>(), lse.data_ptr<float>(), B, Hq, Hkv, S, D, Dv,
                     k.stride(0), k.stride(1), v.stride(0), v.stride(1), static_cast<float>(scale),
                     static_cast<float>(cap));
  });
}

}  // namespace

// q f32 [B, Hq, D] contiguous; k [N, Hkv, D], v [N, Hkv, Dv] (f32/bf16/f16, last dim contiguous);
// slots i64 [B, Hkv, S] contiguous (-1 = padding); out f32 [B, Hq, Dv] and lse f32 [B, Hq] contiguous,
// allocated by the caller (once per decode batch) and written here.
void sparse_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots, double scale,
                      double cap, torch::Tensor out, torch::Tensor lse) {
  TORCH_CHECK(slots.dim() == 3 && slots.size(1) == k.size(1), "slots must be i64 [B, Hkv, S]");
  attend_checked(q, k, v, slots, slots.size(1) * slots.size(2), slots.size(2), slots.size(2), nullptr, scale, cap, out,
                 lse);
}

// Dense decode over a slot table: every query head attends slots[b, :seq_lens[b]] of its KV head (the
// rows past a request's length, capacity padding, are never read). slots i64 [B, L] contiguous, seq_lens
// i64 [B] contiguous; the rest as sparse_attention.
void paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots, torch::Tensor seq_lens,
                     double scale, double cap, torch::Tensor out, torch::Tensor lse) {
  TORCH_CHECK(slots.dim() == 2, "slots must be i64 [B, L]");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kLong && seq_lens.is_contiguous() && seq_lens.numel() == slots.size(0),
              "seq_lens must be contiguous i64 [B]");
  attend_checked(q, k, v, slots, slots.size(1), 0, slots.size(1), seq_lens.data_ptr<int64_t>(), scale, cap, out, lse);
}
