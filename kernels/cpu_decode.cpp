// One sparse decode layer on CPU in one native call: the queries rotated to the WRoPE distances, the
// lookup table of query . centroid scores, the histogram selection (cpu_select.cpp) and the sparse
// attention over the batch's selection buffer (cpu_sparse_attention.cpp). Every tensor is caller-owned
// and allocated once per decode batch; nothing here allocates tensor storage.
#include "cpu_kernels.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// q [B, Hq, D] (f32/bf16/f16, last dim contiguous) -> q32 f32 [B, Hq, D]; q_rot f32 [B, Hq, NB, D] =
// scale * q rotated by (cos, sin) f32 [B, NB, RD/2] (RD <= D; dims past RD pass through), pairing (i, i + RD/2)
// when neox, else (2i, 2i + 1): RopeSpec.apply's arithmetic.
void rotate_queries(const torch::Tensor& q, const torch::Tensor& cos, const torch::Tensor& sin, bool neox,
                    double scale, torch::Tensor& q32, torch::Tensor& q_rot) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, Hq, D] with a contiguous last dim");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), NB = cos.size(1), half = cos.size(2);
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.size(0) == B && 2 * half <= D,
              "cos/sin must be contiguous f32 [B, NB, RD/2] with RD <= D");
  TORCH_CHECK(q32.scalar_type() == torch::kFloat && q32.is_contiguous() && q32.sizes() == q.sizes(),
              "q32 must be contiguous f32 [B, Hq, D]");
  TORCH_CHECK(q_rot.scalar_type() == torch::kFloat && q_rot.is_contiguous() && q_rot.numel() == B * Hq * NB * D,
              "q_rot must be contiguous f32 [B, Hq, NB, D]");
  q32.copy_(q);
  const float* x = q32.data_ptr<float>();
  const float *cs = cos.data_ptr<float>(), *sn = sin.data_ptr<float>();
  float* y = q_rot.data_ptr<float>();
  const float f = static_cast<float>(scale);
  const int64_t rd = 2 * half;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const float* xh = x + (b * Hq + h) * D;
      for (int64_t n = 0; n < NB; ++n) {
        const float *c = cs + (b * NB + n) * half, *s = sn + (b * NB + n) * half;
        float* yh = y + ((b * Hq + h) * NB + n) * D;
        for (int64_t j = 0; j < half; ++j) {
          const int64_t i1 = neox ? j : 2 * j, i2 = neox ? j + half : 2 * j + 1;
          yh[i1] = f * (xh[i1] * c[j] - xh[i2] * s[j]);
          yh[i2] = f * (xh[i2] * c[j] + xh[i1] * s[j]);
        }
        for (int64_t i = rd; i < D; ++i) yh[i] = f * xh[i];
      }
    }
}

// How many leading WRoPE buckets request b's retrieval reads, per request into used[B]: those up to the
// bucket of its farthest scorable position (distance n - 1 - sinks; bucket = #{bounds <= distance}, the
// selection's own rule), none for a request that retrieves nothing (retrieves(), shared with the
// selection); L: the slot table's width.
void used_buckets(const torch::Tensor& seq_lens, const torch::Tensor& k, double top_p, int64_t min_tokens,
                  const torch::Tensor& bounds, int64_t sinks, int64_t window, int64_t NB, int64_t L, int64_t* used) {
  const torch::Tensor lens_t = seq_lens.contiguous(), k_t = k.contiguous(), bounds_t = bounds.contiguous();
  const int64_t *lens = lens_t.data_ptr<int64_t>(), *top = k_t.data_ptr<int64_t>();
  const float* bd = bounds_t.data_ptr<float>();
  for (int64_t b = 0; b < lens_t.numel(); ++b) {
    const int64_t n = std::min(lens[b], L);
    used[b] = 0;
    if (!retrieves(lens[b], n, top[b], top_p, min_tokens, sinks, window)) continue;
    const int64_t farthest = n - 1 - sinks;
    used[b] = 1;
    while (used[b] < NB && static_cast<int64_t>(std::ceil(bd[used[b] - 1])) <= farthest) ++used[b];
  }
}

// lut f32 [B, Hq, NB, C] = q_rot . centroids [Hkv, C, D]: per (request, KV head), the rows of its query
// heads at the distances the request's retrieval reads (used[b] leading buckets; the other rows, which no
// scorable position falls in, are neither computed nor written) against the KV head's centroids, by blocked dot products
// (row_dots), written in place; threads only when the table is large (a library GEMM call per request cost
// more than it computes at decode sizes, and woke its thread team for each).
void lookup_table(const torch::Tensor& q_rot, const torch::Tensor& centroids, const int64_t* used,
                  torch::Tensor& lut) {
  TORCH_CHECK(centroids.dim() == 3 && centroids.scalar_type() == torch::kFloat && centroids.is_contiguous(),
              "centroids must be contiguous f32 [Hkv, C, D]");
  TORCH_CHECK(lut.dim() == 4 && lut.scalar_type() == torch::kFloat && lut.is_contiguous(),
              "lut must be contiguous f32 [B, Hq, NB, C]");
  const int64_t B = lut.size(0), Hkv = centroids.size(0), C = centroids.size(1), D = centroids.size(2);
  TORCH_CHECK(lut.size(3) == C && lut.size(1) % Hkv == 0 && q_rot.size(-1) == D, "lut and centroids disagree");
  const int64_t G = lut.size(1) / Hkv, NB = lut.size(2);
  const float* q = q_rot.data_ptr<float>();
  const float* w = centroids.data_ptr<float>();
  float* out = lut.data_ptr<float>();
  at::parallel_for(0, B * Hkv, a2ats::grain(G * NB * C * D), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t n_used = used[bh / Hkv];
      for (int64_t g = 0; g < G && n_used > 0; ++g) {
        const int64_t row0 = (bh * G + g) * NB;  // this query head's first row
        a2ats::row_dots(q + row0 * D, w + (bh % Hkv) * C * D, n_used, C, D, out + row0 * C, C);
      }
    }
  });
}

}  // namespace

// One layer's retrieved slots into out i64 [B, Hkv, R] (see retrieve_hist_cpu), from the post-RoPE decode
// queries q [B, Hq, D], the batch's WRoPE rotation cos/sin f32 [B, NB, RD/2], the layer's centroids f32
// [Hkv, C, D] and the softmax scale; q32 f32 [B, Hq, D], q_rot f32 [B, Hq, NB, D] and lut f32 [B, Hq, NB, C]
// are the batch's workspaces (lut holds the layer's lookup table afterwards in the rows the selection reads:
// the rows of buckets no scorable position of a request falls in, and every row of a request its budget
// covers, are left as they were).
void retrieve_layer_cpu(torch::Tensor q, torch::Tensor cos, torch::Tensor sin, bool neox, torch::Tensor centroids,
                        double scale, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens, torch::Tensor k,
                        double top_p, int64_t min_tokens, torch::Tensor bounds, int64_t sinks, int64_t window,
                        torch::Tensor q32, torch::Tensor q_rot, torch::Tensor lut, torch::Tensor out) {
  rotate_queries(q, cos, sin, neox, scale, q32, q_rot);
  std::vector<int64_t> used(q.size(0));
  used_buckets(seq_lens, k, top_p, min_tokens, bounds, sinks, window, cos.size(1), slots.size(1), used.data());
  lookup_table(q_rot, centroids, used.data(), lut);
  retrieve_hist_cpu(lut, codes, slots, seq_lens, k, top_p, min_tokens, bounds, sinks, window, out);
}

// retrieve_layer_cpu into selection[..., fixed_width:] (selection i64 [B, Hkv, F + R]: per KV head the
// slots attended in every layer, then room for the retrieved ones), then exact attention of q over the
// whole selection of k_buf [N, Hkv, D] / v_buf [N, Hkv, Dv] -> out f32 [B, Hq, Dv], lse f32 [B, Hq]; the
// number of slots attended (selection >= 0) and of context token-heads are added to attended (i64 [2]).
void decode_layer_cpu(torch::Tensor q, torch::Tensor cos, torch::Tensor sin, bool neox, torch::Tensor centroids,
                      double scale, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens, torch::Tensor k,
                      double top_p, int64_t min_tokens, torch::Tensor bounds, int64_t sinks, int64_t window,
                      torch::Tensor q32, torch::Tensor q_rot, torch::Tensor lut, torch::Tensor selection,
                      int64_t fixed_width, torch::Tensor k_buf, torch::Tensor v_buf, double cap, torch::Tensor out,
                      torch::Tensor lse, torch::Tensor attended) {
  TORCH_CHECK(selection.dim() == 3 && fixed_width >= 0 && fixed_width <= selection.size(2),
              "selection must be i64 [B, Hkv, F + R] with 0 <= F <= its width");
  TORCH_CHECK(attended.scalar_type() == torch::kLong && attended.numel() == 2 && attended.is_contiguous(),
              "attended must be i64 [2]");
  retrieve_layer_cpu(q, cos, sin, neox, centroids, scale, codes, slots, seq_lens, k, top_p, min_tokens, bounds, sinks,
                     window, q32, q_rot, lut, selection.narrow(2, fixed_width, selection.size(2) - fixed_width));
  sparse_attention(q32, k_buf, v_buf, selection, scale, cap, out, lse);
  const int64_t* s = selection.data_ptr<int64_t>();  // contiguous (sparse_attention checked it)
  int64_t count = 0, context = 0;
  for (int64_t i = 0, n = selection.numel(); i < n; ++i) count += s[i] >= 0;
  const torch::Tensor lens = seq_lens.contiguous();
  for (int64_t b = 0; b < lens.numel(); ++b) context += std::min(lens.data_ptr<int64_t>()[b], slots.size(1));
  int64_t* const counts = attended.data_ptr<int64_t>();
  counts[0] += count;
  counts[1] += context * selection.size(1);
}
