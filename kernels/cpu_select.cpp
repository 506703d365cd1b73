// CPU retrieval for one decode layer: approximate scores from the lookup table and
// the top-K of every query head, unioned over its GQA group, in one pass per
// (request, KV head), without materializing [B, Hq, L] scores or sorting L tokens.
//
// Same selection as the torch reference (a2ats_sglang.core.retrieval.SelectionPlan.masks):
// scorable positions are [sinks, n - window); each query head takes its k[b] best by
// (score, then earlier position), compared through the same order-preserving integer
// key of the float32 score; requests whose budget covers them retrieve nothing (their
// fixed part is the whole sequence). Output: the retrieved physical slots in ascending
// position order, -1 padded.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <vector>

namespace {

// float32 score + position -> int64 ordered like scores_with_position_tiebreak.
inline int64_t key(float x, int64_t pos) {  // (score, then earlier position) as one int64 order
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int64_t ord = bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
  return static_cast<int64_t>(static_cast<uint64_t>(ord) << 32) | (0xFFFFFFFFLL - pos);
}

}  // namespace

// lut f32 [B, Hq, NB, C] contiguous; codes int16 [N, Hkv]; slots i64 [B, L] physical slot of each
// position; seq_lens i64 [B]; k i64 [B] per-head top-K; bounds f32 [NB-1] distance bucket bounds.
// Writes the retrieved slots (ascending position, -1 padded) into out i64 [B, Hkv, R] (last dim contiguous;
// any row stride, e.g. a column range of the batch's selection buffer; R: a host-known capacity >= the
// largest union, e.g. G * max(k)).
void retrieve_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
                  torch::Tensor k, torch::Tensor bounds, int64_t sinks, int64_t window, torch::Tensor out) {
  TORCH_CHECK(lut.dim() == 4 && lut.scalar_type() == torch::kFloat, "lut must be f32 [B, Hq, NB, C]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kShort, "codes must be int16 [N, Hkv]");
  TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == torch::kLong, "slots must be i64 [B, L]");
  TORCH_CHECK(lut.is_contiguous() && slots.is_contiguous(), "lut and slots must be contiguous");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kLong && k.scalar_type() == torch::kLong &&
              bounds.scalar_type() == torch::kFloat, "seq_lens and k must be i64, bounds f32");
  TORCH_CHECK(out.dim() == 3 && out.scalar_type() == torch::kLong && out.stride(2) == 1,
              "out must be i64 [B, Hkv, R] with a contiguous last dim");
  auto lens = seq_lens.contiguous();
  auto kk = k.contiguous();
  auto bnd = bounds.contiguous();
  const int64_t B = lut.size(0), Hq = lut.size(1), NB = lut.size(2), C = lut.size(3), Hkv = codes.size(1);
  const int64_t L = slots.size(1), cs = codes.stride(0), ch = codes.stride(1);
  TORCH_CHECK(Hq % Hkv == 0 && slots.size(0) == B && lens.numel() == B && kk.numel() == B && bnd.numel() == NB - 1 &&
              out.size(0) == B && out.size(1) == Hkv, "shape mismatch");
  const int64_t R = out.size(2), ob = out.stride(0), oh = out.stride(1);
  const int64_t G = Hq / Hkv;
  const float* lp = lut.data_ptr<float>();
  const int16_t* cp = codes.data_ptr<int16_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float* bp = bnd.data_ptr<float>();
  const int64_t* np = lens.data_ptr<int64_t>();
  const int64_t* kp = kk.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  std::atomic<int64_t> overflow{0};

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> base, keys;  // base: LUT column of each scorable position
    std::vector<uint8_t> hit;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv, n = std::min(np[b], L), top = kp[b];
      const int64_t lo = sinks, hi = n - window;
      int64_t* row_out = op + b * ob + h * oh;
      std::fill(row_out, row_out + R, -1);
      if (top + sinks + window >= n || hi <= lo || top <= 0) continue;  // covered by the fixed part, or nothing to score
      const int64_t m = hi - lo, want = std::min(top, m);
      base.resize(m);
      int64_t bucket = 0;  // distances fall as positions rise: walk the buckets down
      for (int64_t bkt = 0; bkt < NB - 1; ++bkt) bucket += static_cast<float>(n - 1 - lo) >= bp[bkt];
      for (int64_t j = lo; j < hi; ++j) {
        const float dist = static_cast<float>(n - 1 - j);
        while (bucket > 0 && dist < bp[bucket - 1]) --bucket;
        base[j - lo] = bucket * C + cp[sp[b * L + j] * cs + h * ch];
      }
      hit.assign(m, 0);
      keys.resize(m);
      for (int64_t g = 0; g < G; ++g) {
        const float* row = lp + (b * Hq + h * G + g) * NB * C;
        for (int64_t i = 0; i < m; ++i) keys[i] = key(row[base[i]], lo + i);
        std::nth_element(keys.begin(), keys.begin() + (want - 1), keys.end(), std::greater<int64_t>());
        for (int64_t i = 0; i < want; ++i) hit[0xFFFFFFFFLL - (keys[i] & 0xFFFFFFFFLL) - lo] = 1;
      }
      int64_t count = 0;
      for (int64_t i = 0; i < m; ++i) {
        if (!hit[i]) continue;
        if (count < R) row_out[count] = sp[b * L + lo + i];
        ++count;
      }
      if (count > R) overflow.store(count);
    }
  });
  TORCH_CHECK(overflow.load() == 0, "retrieved ", overflow.load(), " slots for one KV head, more than the capacity ", R);
}
