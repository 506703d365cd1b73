// CPU retrieval for one decode layer: approximate scores from the lookup table and
// the top-K of every query head, unioned over its GQA group.
//
// Two algorithms with one result. retrieve_hist_cpu (served): a token's score is one LUT
// cell (distance bucket x code), so it counts tokens per cell, finds each query head's
// threshold by a radix select over the cells' scores weighted by their counts (O(cells),
// not O(tokens)), and emits the union in one streaming pass over the codes with a
// per-cell bitmask of the heads that take the cell whole; the boundary cells (score equal
// to a head's threshold) give their earliest tokens, as many as that head still needs.
// retrieve_topk_cpu (the earlier kernel, kept as the benchmarks' baseline and a second
// oracle): per head, an int64 key per token and nth_element.
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
void retrieve_topk_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
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

namespace {

inline uint32_t ordered(float x) {  // float32 -> uint32 with the same order
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The want-th largest key over cells weighted by count (keys[c] for the cells in `cells`),
// by four 8-bit radix passes. Returns the threshold key and how many tokens rank above it.
std::pair<uint32_t, int64_t> radix_threshold(const uint32_t* keys, const int32_t* count, std::vector<int32_t>& cells,
                                             std::vector<int32_t>& next, int64_t want) {
  uint32_t prefix = 0;
  int64_t above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    int64_t hist[256] = {0};
    for (int32_t c : cells) hist[(keys[c] >> shift) & 0xFF] += count[c];
    int byte = 255;
    for (; byte > 0; --byte) {
      if (above + hist[byte] >= want) break;
      above += hist[byte];
    }
    prefix |= static_cast<uint32_t>(byte) << shift;
    next.clear();
    for (int32_t c : cells)
      if (((keys[c] >> shift) & 0xFF) == static_cast<uint32_t>(byte)) next.push_back(c);
    cells.swap(next);
  }
  return {prefix, above};
}

}  // namespace

void retrieve_hist_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
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
  const int64_t L = slots.size(1), cs = codes.stride(0), ch = codes.stride(1), NC = NB * C;
  TORCH_CHECK(Hq % Hkv == 0 && slots.size(0) == B && lens.numel() == B && kk.numel() == B && bnd.numel() == NB - 1 &&
              out.size(0) == B && out.size(1) == Hkv, "shape mismatch");
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(G <= 64, "at most 64 query heads per KV head");
  const int64_t R = out.size(2), ob = out.stride(0), oh = out.stride(1);
  const float* lp = lut.data_ptr<float>();
  const int16_t* cp = codes.data_ptr<int16_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float* bp = bnd.data_ptr<float>();
  const int64_t* np = lens.data_ptr<int64_t>();
  const int64_t* kp = kk.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  std::atomic<int64_t> overflow{0};

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    // per-cell state, zero between uses: only the cells a request touches are written and cleared,
    // so a short context with many cells (e.g. 8 distances x 4096 codes) costs O(its tokens)
    std::vector<int32_t> cell, count(NC, 0), nonempty, cand, next;
    std::vector<uint32_t> keys(NC);
    std::vector<uint64_t> whole(NC, 0), tie(NC, 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv, n = std::min(np[b], L), top = kp[b];
      const int64_t lo = sinks, hi = n - window;
      int64_t* row_out = op + b * ob + h * oh;
      std::fill(row_out, row_out + R, -1);
      if (top + sinks + window >= n || hi <= lo || top <= 0) continue;  // covered by the fixed part, or nothing to score
      const int64_t m = hi - lo, want = std::min(top, m);
      // 1. each scorable token's cell, and the tokens per cell
      cell.resize(m);
      nonempty.clear();
      int64_t bucket = 0;  // distances fall as positions rise: walk the buckets down
      for (int64_t bkt = 0; bkt < NB - 1; ++bkt) bucket += static_cast<float>(n - 1 - lo) >= bp[bkt];
      for (int64_t j = lo; j < hi; ++j) {
        const float dist = static_cast<float>(n - 1 - j);
        while (bucket > 0 && dist < bp[bucket - 1]) --bucket;
        const int32_t c = static_cast<int32_t>(bucket * C + cp[sp[b * L + j] * cs + h * ch]);
        cell[j - lo] = c;
        if (count[c]++ == 0) nonempty.push_back(c);
      }
      // 2. each query head's threshold over the cells: whole cells above it, a tie group at it
      int64_t need[64];
      for (int64_t g = 0; g < G; ++g) {
        const float* row = lp + (b * Hq + h * G + g) * NC;
        for (int32_t c : nonempty) keys[c] = ordered(row[c]);
        cand = nonempty;
        const auto [threshold, above] = radix_threshold(keys.data(), count.data(), cand, next, want);
        need[g] = want - above;
        const uint64_t bit = uint64_t{1} << g;
        for (int32_t c : nonempty) {
          if (keys[c] > threshold) whole[c] |= bit;
          else if (keys[c] == threshold) tie[c] |= bit;
        }
      }
      // 3. one pass in position order: the union, ties to the earlier position
      int64_t written = 0;
      for (int64_t i = 0; i < m; ++i) {
        const int32_t c = cell[i];
        bool take = whole[c] != 0;
        for (uint64_t t = tie[c]; t; t &= t - 1) {
          const int g = __builtin_ctzll(t);
          if (need[g] > 0) {
            --need[g];
            take = true;
          }
        }
        if (!take) continue;
        if (written < R) row_out[written] = sp[b * L + lo + i];
        ++written;
      }
      if (written > R) overflow.store(written);
      for (int32_t c : nonempty) count[c] = 0, whole[c] = 0, tie[c] = 0;
    }
  });
  TORCH_CHECK(overflow.load() == 0, "retrieved ", overflow.load(), " slots for one KV head, more than the capacity ", R);
}
