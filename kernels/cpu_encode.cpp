// Codes of new keys on CPU: each post-RoPE key un-rotated to its pre-RoPE form (RopeSpec.unrotate's
// arithmetic), then its nearest centroid in the whitened space, the argmax over codes of k . w_c + b_c (the
// encoder of a2ats_sglang.core.codebook.LayerCodebook), stored at its physical slot. One native call per
// layer, no tensor allocated.
#include "cpu_kernels.h"
#include "cpu_vec.h"

#include <cmath>
#include <vector>

namespace {
constexpr int64_t kTokens = 8;  // keys scored together, so that each block of encoder rows is read once for them
}

// k f32 [T, Hkv, D] post-RoPE (last dim contiguous, any row and head strides); positions i64 [T]; the rotation:
// inv_freq f32 [RD/2] (RD <= D; dims past RD pass through), neox pairing (i, i + RD/2) else (2i, 2i + 1),
// mscale; enc_rows f32 [Hkv, C, D] and enc_bias f32 [Hkv, C] contiguous; loc i64 [T] physical slots; codes
// int16 [N, Hkv] (one layer's, last dim contiguous): codes[loc[t], h] = argmax_c (unrotate(k[t, h]) .
// enc_rows[h, c] + enc_bias[h, c]), the first on ties (torch.argmax).
void encode_keys(torch::Tensor k, torch::Tensor positions, torch::Tensor inv_freq, bool neox, double mscale,
                 torch::Tensor enc_rows, torch::Tensor enc_bias, torch::Tensor loc, torch::Tensor codes) {
  TORCH_CHECK(k.dim() == 3 && k.scalar_type() == torch::kFloat && k.stride(2) == 1,
              "k must be f32 [T, Hkv, D] with a contiguous last dim");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == torch::kLong && positions.is_contiguous() &&
              loc.dim() == 1 && loc.scalar_type() == torch::kLong && loc.is_contiguous(),
              "positions and loc must be contiguous i64 [T]");
  TORCH_CHECK(inv_freq.dim() == 1 && inv_freq.scalar_type() == torch::kFloat && inv_freq.is_contiguous(),
              "inv_freq must be contiguous f32 [RD/2]");
  TORCH_CHECK(enc_rows.dim() == 3 && enc_rows.scalar_type() == torch::kFloat && enc_rows.is_contiguous() &&
              enc_bias.scalar_type() == torch::kFloat && enc_bias.is_contiguous(),
              "enc_rows must be contiguous f32 [Hkv, C, D], enc_bias contiguous f32 [Hkv, C]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kShort && codes.stride(1) == 1,
              "codes must be int16 [N, Hkv] with a contiguous last dim");
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2), C = enc_rows.size(1), half = inv_freq.numel();
  TORCH_CHECK(enc_rows.size(0) == Hkv && enc_rows.size(2) == D && enc_bias.numel() == Hkv * C &&
              positions.numel() == T && loc.numel() == T && codes.size(1) == Hkv && 2 * half <= D, "shape mismatch");
  const float *kp = k.data_ptr<float>(), *freq = inv_freq.data_ptr<float>(), *w = enc_rows.data_ptr<float>(),
              *bias = enc_bias.data_ptr<float>();
  const int64_t *pos = positions.data_ptr<int64_t>(), *slot = loc.data_ptr<int64_t>();
  int16_t* out = codes.data_ptr<int16_t>();
  const int64_t ks_t = k.stride(0), ks_h = k.stride(1), row = codes.stride(0), blocks = (T + kTokens - 1) / kTokens;
  const float ms = static_cast<float>(mscale), ms2 = static_cast<float>(mscale * mscale);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < codes.size(0), "slot ", slot[t], " outside the codes buffer");
  at::parallel_for(0, Hkv * blocks, a2ats::grain(kTokens * C * D), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> keys, scores;
    keys.resize(kTokens * D);
    scores.resize(kTokens * C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / blocks, t0 = (item % blocks) * kTokens, n = std::min(kTokens, T - t0);
      for (int64_t i = 0; i < n; ++i) {  // rotate by -position, undo mscale: RopeSpec.unrotate
        const float* x = kp + (t0 + i) * ks_t + h * ks_h;
        float* y = keys.data() + i * D;
        const float p = -static_cast<float>(pos[t0 + i]);
        for (int64_t j = 0; j < half; ++j) {
          const float a = p * freq[j], c = std::cos(a) * ms, s = std::sin(a) * ms;
          const int64_t i1 = neox ? j : 2 * j, i2 = neox ? j + half : 2 * j + 1;
          y[i1] = (x[i1] * c - x[i2] * s) / ms2;
          y[i2] = (x[i2] * c + x[i1] * s) / ms2;
        }
        for (int64_t d = 2 * half; d < D; ++d) y[d] = x[d];
      }
      a2ats::row_dots(keys.data(), w + h * C * D, n, C, D, scores.data(), C);
      const float* b = bias + h * C;
      for (int64_t i = 0; i < n; ++i) {
        const float* s = scores.data() + i * C;
        int64_t best = 0;
        float top = s[0] + b[0];
        for (int64_t c = 1; c < C; ++c) {
          const float x = s[c] + b[c];
          if (x > top) top = x, best = c;
        }
        out[slot[t0 + i] * row + h] = static_cast<int16_t>(best);
      }
    }
  });
}
