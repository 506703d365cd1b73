// CPU retrieval for one decode layer: approximate scores from the lookup table and
// the top-K of every query head, unioned over its GQA group.
//
// Two algorithms with one result. retrieve_hist_cpu (served): a token's score is one LUT
// cell (distance bucket x code), so it counts tokens per cell, finds each query head's
// threshold by a radix select over the cells' scores weighted by their counts, with digits
// fitted to the scores' range (O(cells), not O(tokens)), and emits the union in one
// streaming pass over the codes with a per-cell bitmask of the heads that take the cell
// whole; the boundary cells (score equal to a head's threshold) give their earliest
// tokens, as many as that head still needs.
// retrieve_topk_cpu (the earlier kernel, kept as the benchmarks' baseline and a second
// oracle): per head, an int64 key per token and nth_element.
//
// Same selection as the torch reference (a2ats_sglang.core.retrieval.SelectionPlan.masks):
// scorable positions are [sinks, n - window); each query head takes its k[b] best by
// (score, then earlier position), compared through the same order-preserving integer
// key of the float32 score; requests whose budget covers them retrieve nothing (their
// fixed part is the whole sequence). Output: the retrieved physical slots in ascending
// position order, -1 padded.
#include "cpu_kernels.h"
#include "cpu_vec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace {

// The inputs of one layer's retrieval, checked once. lut f32 [B, Hq, NB, C] contiguous; codes int16
// [N, Hkv]; slots i64 [B, L] physical slot of each position, contiguous; seq_lens i64 [B]; k i64 [B]
// per-head top-K (top_p > 0: the most tokens a head takes); top_p: the adaptive budget's mass (0: fixed
// budget), min_tokens its least count; bounds f32 [NB-1] distance bucket bounds; out i64 [B, Hkv, R] (last
// dim contiguous, any row stride, e.g. a column range of the batch's selection buffer; R: a host-known
// capacity >= the largest union, e.g. G * max(k)).
struct Selection {
  torch::Tensor lens_t, k_t, bounds_t;  // contiguous copies kept alive
  const float* lut;
  const int16_t* codes;
  const int64_t* slots;
  const float* bounds;
  const int64_t* lens;
  const int64_t* k;
  int64_t* out;
  int64_t B, Hq, NB, C, Hkv, G, L, R, code_row, code_head, out_b, out_h, sinks, window, min_tokens;
  double top_p;

  Selection(torch::Tensor lut_, torch::Tensor codes_, torch::Tensor slots_, torch::Tensor seq_lens,
            torch::Tensor k_, double top_p_, int64_t min_tokens_, torch::Tensor bounds_, int64_t sinks_,
            int64_t window_, torch::Tensor out_) {
    TORCH_CHECK(lut_.dim() == 4 && lut_.scalar_type() == torch::kFloat, "lut must be f32 [B, Hq, NB, C]");
    TORCH_CHECK(codes_.dim() == 2 && codes_.scalar_type() == torch::kShort, "codes must be int16 [N, Hkv]");
    TORCH_CHECK(slots_.dim() == 2 && slots_.scalar_type() == torch::kLong, "slots must be i64 [B, L]");
    TORCH_CHECK(lut_.is_contiguous() && slots_.is_contiguous(), "lut and slots must be contiguous");
    TORCH_CHECK(seq_lens.scalar_type() == torch::kLong && k_.scalar_type() == torch::kLong &&
                bounds_.scalar_type() == torch::kFloat, "seq_lens and k must be i64, bounds f32");
    TORCH_CHECK(out_.dim() == 3 && out_.scalar_type() == torch::kLong && out_.stride(2) == 1,
                "out must be i64 [B, Hkv, R] with a contiguous last dim");
    lens_t = seq_lens.contiguous();
    k_t = k_.contiguous();
    bounds_t = bounds_.contiguous();
    B = lut_.size(0), Hq = lut_.size(1), NB = lut_.size(2), C = lut_.size(3), Hkv = codes_.size(1);
    L = slots_.size(1), R = out_.size(2);
    TORCH_CHECK(Hq % Hkv == 0 && slots_.size(0) == B && lens_t.numel() == B && k_t.numel() == B &&
                bounds_t.numel() == NB - 1 && out_.size(0) == B && out_.size(1) == Hkv, "shape mismatch");
    G = Hq / Hkv;
    code_row = codes_.stride(0), code_head = codes_.stride(1), out_b = out_.stride(0), out_h = out_.stride(1);
    sinks = sinks_, window = window_, top_p = top_p_, min_tokens = min_tokens_;
    TORCH_CHECK(top_p >= 0.0 && top_p <= 1.0 && min_tokens >= 0, "top_p must be in [0, 1], min_tokens >= 0");
    lut = lut_.data_ptr<float>(), codes = codes_.data_ptr<int16_t>(), slots = slots_.data_ptr<int64_t>();
    bounds = bounds_t.data_ptr<float>(), lens = lens_t.data_ptr<int64_t>(), k = k_t.data_ptr<int64_t>();
    out = out_.data_ptr<int64_t>();
  }

  // Visits the LUT cell (distance bucket x C + code) of positions [lo, hi) of request b for KV head h, in
  // position order. Position j is at distance n - 1 - j, in bucket #{bounds <= distance}; distances fall as
  // positions rise, so each bucket is a run of positions, the one above bound B starting at distance ceil(B)
  // (exact for distances below 2^24).
  template <typename Visit>
  void cells(int64_t b, int64_t h, int64_t n, int64_t lo, int64_t hi, Visit visit) const {
    const int64_t* sl = slots + b * L;
    const int16_t* col = codes + h * code_head;
    int64_t j = lo;
    for (int64_t bucket = NB - 1; bucket >= 0 && j < hi; --bucket) {
      const int64_t nearest = bucket == 0 ? 0 : static_cast<int64_t>(std::ceil(bounds[bucket - 1]));
      const int64_t end = std::min(hi, n - nearest);
      const int32_t base = static_cast<int32_t>(bucket * C);
      for (; j < end; ++j) visit(j - lo, base + col[sl[j] * code_row]);
    }
  }

  // Runs select(b, h, n, lo, m, top, compact) for every (request, KV head) with tokens to retrieve (top: the
  // most any head takes, <= m); select calls compact(take) once, take(i) true for each retrieved position
  // lo + i. Fills the rest with -1. A request is covered (nothing to retrieve) when its least count +
  // sinks + window reach its length.
  template <typename Select>
  void run(Select select) const {
    std::atomic<int64_t> overflow{0};
    at::parallel_for(0, B * Hkv, a2ats::grain(L * kSelectTokenWork), [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv, n = std::min(lens[b], L), top = k[b];
        const int64_t lo = sinks, hi = n - window;
        int64_t* const row = out + b * out_b + h * out_h;
        int64_t written = 0;
        if (retrieves(lens[b], n, top, top_p, min_tokens, sinks, window)) {  // else covered by the fixed part, or nothing to score
          const int64_t* const sl = slots + b * L + lo;
          const int64_t m = hi - lo;
          select(b, h, n, lo, m, std::min(top, m), [&](auto take) { written = compact(sl, m, row, R, take); });
        }
        if (written > R) overflow.store(written);
        std::fill(row + std::min(written, R), row + R, -1);
      }
    });
    TORCH_CHECK(overflow.load() == 0, "retrieved ", overflow.load(), " slots for one KV head, more than the capacity ", R);
  }

  // The slots sl[i] of the positions i < m with take(i), in order, into row[0:R) without a branch per
  // position (every slot is written, the count advances by the take bit, writes past a full row go to a
  // spill word); returns how many were taken (> R: an overflow).
  template <typename Take>
  static int64_t compact(const int64_t* sl, int64_t m, int64_t* row, int64_t R, Take take) {
    int64_t written = 0, spill;
    for (int64_t i = 0; i < m; ++i) {
      const bool t = take(i);
      *(written < R ? row + written : &spill) = sl[i];
      written += t;
    }
    return written;
  }
};

// float32 score + position -> int64 ordered like scores_with_position_tiebreak.
inline int64_t key(float x, int64_t pos) {  // (score, then earlier position) as one int64 order
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int64_t ord = bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
  return static_cast<int64_t>(static_cast<uint64_t>(ord) << 32) | (0xFFFFFFFFLL - pos);
}

inline uint32_t ordered(float x) {  // float32 -> uint32 with the same order
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// One thread's working memory for retrieve_hist_cpu, kept between calls: per cell (NC = NB * C) the token
// count, its key under the current head, whether some head takes it whole (kWhole) or cuts it at its
// threshold (kTie), the heads that cut it (bitmask) and a head's mass; per token its cell; the cell lists of
// the threshold search.
struct HistScratch {
  std::vector<int32_t> cell, count, nonempty, cand, next;
  std::vector<uint32_t> keys;
  std::vector<uint8_t> flag;
  std::vector<uint64_t> tie;
  std::vector<double> mass;

  void reserve(int64_t cells, int64_t tokens) {
    if (static_cast<int64_t>(count.size()) < cells)
      count.assign(cells, 0), keys.resize(cells), flag.assign(cells, 0), tie.assign(cells, 0), mass.resize(cells);
    if (static_cast<int64_t>(cell.size()) < tokens) cell.resize(tokens);
  }
};
constexpr uint8_t kWhole = 1, kTie = 2;

constexpr int kBinBits = 11;  // radix digit of select_threshold: 2^11 bins per level

// The threshold of the cells in `cells` by their keys, largest first, weighted by weight[c] (token counts,
// or a head's estimated softmax mass): the key t with (weight of keys > t) < want <= (weight of keys >= t).
// A radix select whose digits adapt to the keys' range: each level bins [min, max] of the remaining keys
// into 2^kBinBits and keeps the bin where `want` is reached (one head's scores share sign and exponent,
// so fixed bytes of the key would split little); `range`: the min and max key of `cells`, found by the
// caller as it wrote the keys. Calls above(c) for every cell whose key is > t; returns t and the weight
// above it, and leaves the cells of key t in `cells`.
template <typename W, typename A, typename Above>
std::pair<uint32_t, A> select_threshold(const uint32_t* keys, const W* weight, std::vector<int32_t>& cells,
                                        std::vector<int32_t>& next, std::pair<uint32_t, uint32_t> range, A want,
                                        Above above) {
  A above_weight = 0;
  for (auto [lo, hi] = range;;) {
    if (lo >= hi) return {lo, above_weight};  // one key left: the threshold
    const int shift = std::max(0, 32 - __builtin_clz(hi - lo) - kBinBits);
    A hist[1 << kBinBits] = {0};
    for (int32_t c : cells) hist[(keys[c] - lo) >> shift] += weight[c];
    uint32_t bin = (hi - lo) >> shift;
    for (; bin > 0; --bin) {
      if (above_weight + hist[bin] >= want) break;
      above_weight += hist[bin];
    }
    next.clear();
    uint32_t next_lo = std::numeric_limits<uint32_t>::max(), next_hi = 0;
    for (int32_t c : cells) {
      const uint32_t at = (keys[c] - lo) >> shift;
      if (at > bin) {
        above(c);
      } else if (at == bin) {
        next.push_back(c);
        next_lo = std::min(next_lo, keys[c]), next_hi = std::max(next_hi, keys[c]);
      }
    }
    cells.swap(next);
    if (shift == 0) return {lo + bin, above_weight};
    lo = next_lo, hi = next_hi;
  }
}

// Adaptive budget of one query head (row: its LUT, f32 [NB * C]): the fewest best tokens whose mass
// count * exp(s - max) (float64) reaches top_p of the total, clamped to [least, most]; the same count as
// the torch reference's token-level cumulative sum (a cell's tokens share one weight).
// keys: ordered(row[c]) of the non-empty cells.
int64_t top_p_tokens(const float* row, const std::vector<int32_t>& nonempty, const int32_t* count,
                     const uint32_t* keys, std::pair<uint32_t, uint32_t> range, std::vector<double>& mass,
                     std::vector<int32_t>& cand, std::vector<int32_t>& next, double top_p, int64_t least,
                     int64_t most) {
  double mx = -std::numeric_limits<double>::infinity(), total = 0.0;
  for (int32_t c : nonempty) mx = std::max(mx, static_cast<double>(row[c]));
  for (int32_t c : nonempty) {
    mass[c] = count[c] * std::exp(static_cast<double>(row[c]) - mx);
    total += mass[c];
  }
  cand = nonempty;
  const double target = top_p * total;
  const auto [threshold, above_mass] = select_threshold(keys, mass.data(), cand, next, range, target, [](int32_t) {});
  int64_t above = 0, at = 0;
  for (int32_t c : nonempty) {
    if (keys[c] > threshold) above += count[c];
    else if (keys[c] == threshold) at += count[c];
  }
  const double w = std::exp(static_cast<double>(row[cand.front()]) - mx);
  const int64_t need = std::clamp<int64_t>(static_cast<int64_t>(std::ceil((target - above_mass) / w)), 1, at);
  return std::min(std::max(above + need, least), most);
}

}  // namespace

void retrieve_topk_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
                       torch::Tensor k, torch::Tensor bounds, int64_t sinks, int64_t window, torch::Tensor out) {
  const Selection sel(lut, codes, slots, seq_lens, k, 0.0, 0, bounds, sinks, window, out);  // fixed budgets only
  sel.run([&](int64_t b, int64_t h, int64_t n, int64_t lo, int64_t m, int64_t want, auto compact) {
    thread_local std::vector<int32_t> base;  // LUT column of each scorable position
    thread_local std::vector<int64_t> keys;
    thread_local std::vector<uint8_t> hit;
    base.resize(m);
    sel.cells(b, h, n, lo, lo + m, [&](int64_t i, int32_t c) { base[i] = c; });
    hit.assign(m, 0);
    keys.resize(m);
    for (int64_t g = 0; g < sel.G; ++g) {
      const float* row = sel.lut + (b * sel.Hq + h * sel.G + g) * sel.NB * sel.C;
      for (int64_t i = 0; i < m; ++i) keys[i] = key(row[base[i]], lo + i);
      std::nth_element(keys.begin(), keys.begin() + (want - 1), keys.end(), std::greater<int64_t>());
      for (int64_t i = 0; i < want; ++i) hit[0xFFFFFFFFLL - (keys[i] & 0xFFFFFFFFLL) - lo] = 1;
    }
    const uint8_t* const taken = hit.data();
    compact([taken](int64_t i) { return taken[i] != 0; });
  });
}

void retrieve_hist_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
                       torch::Tensor k, double top_p, int64_t min_tokens, torch::Tensor bounds, int64_t sinks,
                       int64_t window, torch::Tensor out) {
  const Selection sel(lut, codes, slots, seq_lens, k, top_p, min_tokens, bounds, sinks, window, out);
  TORCH_CHECK(sel.G <= 64, "at most 64 query heads per KV head");
  const int64_t NC = sel.NB * sel.C;
  sel.run([&](int64_t b, int64_t h, int64_t n, int64_t lo, int64_t m, int64_t top, auto compact) {
    // per-cell state, zero between uses (only the cells a request touches are cleared). Fetched once per
    // task: a thread_local named in the loops costs a TLS lookup per use in a shared library.
    thread_local HistScratch scratch;
    HistScratch& s = scratch;
    s.reserve(NC, m);
    int32_t* const cell = s.cell.data();
    int32_t* const count = s.count.data();
    uint8_t* const flag = s.flag.data();
    uint64_t* const tie = s.tie.data();
    uint32_t* const keys = s.keys.data();
    // 1. each scorable token's cell, the tokens per cell, the cells that hold any (a scan of the NC cells:
    // the lookup table already costs O(NC x D) per query head)
    sel.cells(b, h, n, lo, lo + m, [&](int64_t i, int32_t c) { cell[i] = c, ++count[c]; });
    s.nonempty.clear();
    for (int32_t c = 0; c < NC; ++c)
      if (count[c]) s.nonempty.push_back(c);
    // 2. each query head's threshold over the cells: whole cells above it, a tie group at it
    int64_t need[64];
    for (int64_t g = 0; g < sel.G; ++g) {
      const float* row = sel.lut + (b * sel.Hq + h * sel.G + g) * NC;
      std::pair<uint32_t, uint32_t> range{std::numeric_limits<uint32_t>::max(), 0};
      for (int32_t c : s.nonempty) {
        const uint32_t key = ordered(row[c]);
        keys[c] = key;
        range = {std::min(range.first, key), std::max(range.second, key)};
      }
      const int64_t want = sel.top_p > 0.0 ? top_p_tokens(row, s.nonempty, count, keys, range, s.mass, s.cand, s.next,
                                                          sel.top_p, std::min(sel.min_tokens, top), top)
                                            : top;
      s.cand = s.nonempty;
      need[g] = want - select_threshold(keys, count, s.cand, s.next, range, want, [&](int32_t c) { flag[c] |= kWhole; }).second;
      for (int32_t c : s.cand) tie[c] |= uint64_t{1} << g, flag[c] |= kTie;  // the cells at the threshold
    }
    // 3. one pass in position order: the union, ties to the earlier position
    compact([cell, flag, tie, &need](int64_t i) {
      const int32_t c = cell[i];
      const uint8_t f = flag[c];
      bool take = f & kWhole;
      if (f & kTie) [[unlikely]] {
        for (uint64_t t = tie[c]; t; t &= t - 1) {
          const int g = __builtin_ctzll(t);
          if (need[g] > 0) {
            --need[g];
            take = true;
          }
        }
      }
      return take;
    });
    for (int32_t c : s.nonempty) count[c] = 0, flag[c] = 0, tie[c] = 0;
  });
}
