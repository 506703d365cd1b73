// Codes of new keys on CPU: each pre-RoPE key's nearest centroid in the whitened space, the argmax over
// codes of k . w_c + b_c (the encoder of a2ats_sglang.core.codebook.LayerCodebook), stored at its slot.
#include "cpu_kernels.h"
#include "cpu_vec.h"

#include <vector>

namespace {
constexpr int64_t kTokens = 8;  // keys scored together, so that each block of encoder rows is read once for them
}

// k_pre f32 [T, Hkv, D] contiguous; enc_rows f32 [Hkv, C, D] and enc_bias f32 [Hkv, C] contiguous; loc i64 [T]
// physical slots; codes int16 [N, Hkv] (one layer's, last dim contiguous):
// codes[loc[t], h] = argmax_c (k_pre[t, h] . enc_rows[h, c] + enc_bias[h, c]), the first on ties (torch.argmax).
void encode_keys(torch::Tensor k_pre, torch::Tensor enc_rows, torch::Tensor enc_bias, torch::Tensor loc,
                 torch::Tensor codes) {
  TORCH_CHECK(k_pre.dim() == 3 && k_pre.scalar_type() == torch::kFloat && k_pre.is_contiguous(),
              "k_pre must be contiguous f32 [T, Hkv, D]");
  TORCH_CHECK(enc_rows.dim() == 3 && enc_rows.scalar_type() == torch::kFloat && enc_rows.is_contiguous() &&
              enc_bias.scalar_type() == torch::kFloat && enc_bias.is_contiguous(),
              "enc_rows must be contiguous f32 [Hkv, C, D], enc_bias contiguous f32 [Hkv, C]");
  TORCH_CHECK(loc.dim() == 1 && loc.scalar_type() == torch::kLong && loc.is_contiguous(), "loc must be i64 [T]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kShort && codes.stride(1) == 1,
              "codes must be int16 [N, Hkv] with a contiguous last dim");
  const int64_t T = k_pre.size(0), Hkv = k_pre.size(1), D = k_pre.size(2), C = enc_rows.size(1);
  TORCH_CHECK(enc_rows.size(0) == Hkv && enc_rows.size(2) == D && enc_bias.numel() == Hkv * C && loc.numel() == T &&
              codes.size(1) == Hkv, "shape mismatch");
  const float *k = k_pre.data_ptr<float>(), *w = enc_rows.data_ptr<float>(), *bias = enc_bias.data_ptr<float>();
  const int64_t* slot = loc.data_ptr<int64_t>();
  int16_t* out = codes.data_ptr<int16_t>();
  const int64_t row = codes.stride(0), blocks = (T + kTokens - 1) / kTokens;
  at::parallel_for(0, Hkv * blocks, a2ats::grain(kTokens * C * D), [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> keys, scores;
    keys.resize(kTokens * D);
    scores.resize(kTokens * C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / blocks, t0 = (item % blocks) * kTokens, n = std::min(kTokens, T - t0);
      for (int64_t i = 0; i < n; ++i) std::copy_n(k + ((t0 + i) * Hkv + h) * D, D, keys.data() + i * D);
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
        const int64_t dst = slot[t0 + i];
        TORCH_CHECK(dst >= 0 && dst < codes.size(0), "slot ", dst, " outside the codes buffer");
        out[dst * row + h] = static_cast<int16_t>(best);
      }
    }
  });
}
