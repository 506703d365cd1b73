// The CPU kernels' entry points, shared by the bindings and the fused decode layer.
#pragma once
#include <torch/extension.h>

#include <algorithm>

// What one token of one KV head costs the selection, counted in multiply-adds for a2ats::kSerialWork: 25 is
// ~1-2 ns on one core, about what the reworked selection takes per token and KV head (BENCHMARKS.md §10).
constexpr int64_t kSelectTokenWork = 25;

// Whether a request of len tokens, scored positions of whose slot table hold n (= len unless the table is
// shorter), retrieves anything: not when its least count (top, or with top_p > 0 min(min_tokens, top)) +
// sinks + window cover it, nor when no position lies between sinks and window (the torch reference's rule,
// SelectionPlan). The selection and the lookup table's bucket count share it.
inline bool retrieves(int64_t len, int64_t n, int64_t top, double top_p, int64_t min_tokens, int64_t sinks,
                      int64_t window) {
  const int64_t least = top_p > 0.0 ? std::min(min_tokens, top) : top;
  return least + sinks + window < len && n - window > sinks && top > 0;
}

void encode_keys(torch::Tensor k, torch::Tensor positions, torch::Tensor inv_freq, bool neox, double mscale,
                 torch::Tensor enc_rows, torch::Tensor enc_bias, torch::Tensor loc, torch::Tensor codes);
void sparse_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots, double scale,
                      double cap, torch::Tensor out, torch::Tensor lse);
void paged_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots, torch::Tensor seq_lens,
                     double scale, double cap, torch::Tensor out, torch::Tensor lse);
void retrieve_hist_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
                       torch::Tensor k, double top_p, int64_t min_tokens, torch::Tensor bounds, int64_t sinks,
                       int64_t window, torch::Tensor out);
void retrieve_topk_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
                       torch::Tensor k, torch::Tensor bounds, int64_t sinks, int64_t window, torch::Tensor out);
void retrieve_layer_cpu(torch::Tensor q, torch::Tensor cos, torch::Tensor sin, bool neox, torch::Tensor centroids,
                        double scale, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens, torch::Tensor k,
                        double top_p, int64_t min_tokens, torch::Tensor bounds, int64_t sinks, int64_t window,
                        torch::Tensor q32, torch::Tensor q_rot, torch::Tensor lut, torch::Tensor out);
void decode_layer_cpu(torch::Tensor q, torch::Tensor cos, torch::Tensor sin, bool neox, torch::Tensor centroids,
                      double scale, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens, torch::Tensor k,
                      double top_p, int64_t min_tokens, torch::Tensor bounds, int64_t sinks, int64_t window,
                      torch::Tensor q32, torch::Tensor q_rot, torch::Tensor lut, torch::Tensor selection,
                      int64_t fixed_width, torch::Tensor k_buf, torch::Tensor v_buf, double cap, torch::Tensor out,
                      torch::Tensor lse, torch::Tensor attended);
