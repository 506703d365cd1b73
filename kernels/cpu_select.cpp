// CPU retrieval for one decode layer: approximate scores from the lookup table and
// the top-K of every query head, unioned over its GQA group.
//
// Two algorithms with one result. retrieve_hist_cpu (served): a token's score is one LUT
// cell (distance bucket x code), so it counts tokens per cell, finds each query head's
// threshold over the cells (O(cells), not O(tokens)): bit by bit over the scores'
// order-preserving integer keys, each step one vectorized pass that sums the counts of the
// cells at or above a candidate, narrowed every 4 bits to the cells still in range; and emits
// the union in one streaming pass over the tokens' cells with a per-cell flag of whether some
// head takes the cell whole (16 positions at a time with AVX-512); the boundary cells (score
// equal to a head's threshold) give their earliest tokens, as many as that head still needs.
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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

  // Calls run(first, last, base) for the positions [lo, hi) of a request of n tokens split into runs of one
  // distance bucket, in position order (base = bucket x C: the run's first LUT cell). Position j is at
  // distance n - 1 - j, in bucket #{bounds <= distance}; distances fall as positions rise, so each bucket is a
  // run of positions, the one above bound B starting at distance ceil(B) (exact for distances below 2^24).
  // Returns the number of leading cells any of the positions can fall in: (the farthest bucket + 1) x C.
  template <typename Run>
  int64_t bucket_runs(int64_t n, int64_t lo, int64_t hi, Run run) const {
    int64_t j = lo, used = 0;
    for (int64_t bucket = NB - 1; bucket >= 0 && j < hi; --bucket) {
      const int64_t nearest = bucket == 0 ? 0 : static_cast<int64_t>(std::ceil(bounds[bucket - 1]));
      const int64_t end = std::min(hi, n - nearest);
      if (j >= end) continue;
      if (used == 0) used = (bucket + 1) * C;
      run(j, end, static_cast<int32_t>(bucket * C));
      j = end;
    }
    return used;
  }

  // Visits the LUT cell (bucket x C + code) of positions [lo, hi) of request b for KV head h, in position
  // order, as visit(j - lo, cell); returns bucket_runs' cell count.
  template <typename Visit>
  int64_t cells(int64_t b, int64_t h, int64_t n, int64_t lo, int64_t hi, Visit visit) const {
    const int64_t* sl = slots + b * L;
    const int16_t* col = codes + h * code_head;
    return bucket_runs(n, lo, hi, [&](int64_t first, int64_t last, int32_t base) {
      for (int64_t j = first; j < last; ++j) visit(j - lo, base + col[sl[j] * code_row]);
    });
  }

  // cells() into cell[j - lo], counting the tokens per cell into count (the arrays do not alias: four
  // positions' codes are read before their cells are stored and counted). With AVX-512, a block of 16 (or,
  // for wider code rows, 8) positions whose slots are consecutive, as SGLang allocates a prefill, has its
  // codes in at most 64 int16 from the first one's: two masked loads and one permute; the run's cells are
  // counted after they are all stored (loads right behind a vector store would wait for it).
  int64_t count_cells(int64_t b, int64_t h, int64_t n, int64_t lo, int64_t hi, int32_t* cell_out,
                      int32_t* count_out) const {
    const int64_t* __restrict sl = slots + b * L;
    const int16_t* __restrict col = codes + h * code_head;
    int32_t* __restrict cell = cell_out - lo;  // indexed by position
    int32_t* __restrict count = count_out;
    const int64_t row = code_row;
#if defined(__AVX512BW__)
    const int64_t lanes = 15 * row < 64 ? 16 : 7 * row < 64 ? 8 : 0;  // 0: no block's codes fit
    alignas(64) int16_t at[32] = {0};
    for (int64_t l = 0; l < lanes; ++l) at[l] = static_cast<int16_t>(l * row);
    const __m512i pick = _mm512_load_si512(at);
    const int64_t span = lanes ? (lanes - 1) * row + 1 : 0;  // the codes a block reads, none further
    const __mmask32 first_half = span >= 32 ? ~__mmask32{0} : (__mmask32{1} << span) - 1;
    const __mmask32 second_half = span > 32 ? (__mmask32{1} << (span - 32)) - 1 : 0;
    const __mmask16 stored = lanes == 16 ? 0xFFFF : 0xFF;
    const __m512i step = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), eight = _mm512_set1_epi64(8);
#endif
    return bucket_runs(n, lo, hi, [&](int64_t first, int64_t last, int32_t base) {
      int64_t j = first;
#if defined(__AVX512BW__)
      for (; lanes && j + lanes <= last; j += lanes) {
        const __m512i run = _mm512_add_epi64(_mm512_set1_epi64(sl[j]), step);
        __mmask8 apart = _mm512_cmpneq_epi64_mask(_mm512_loadu_si512(sl + j), run);
        if (lanes == 16) apart |= _mm512_cmpneq_epi64_mask(_mm512_loadu_si512(sl + j + 8), _mm512_add_epi64(run, eight));
        if (apart) {
          for (int64_t x = j; x < j + lanes; ++x) cell[x] = base + col[sl[x] * row];
          continue;
        }
        const int16_t* p = col + sl[j] * row;
        const __m512i block = _mm512_permutex2var_epi16(_mm512_maskz_loadu_epi16(first_half, p), pick,
                                                        _mm512_maskz_loadu_epi16(second_half, p + 32));
        _mm512_mask_storeu_epi32(cell + j, stored, _mm512_add_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(block)),
                                                                    _mm512_set1_epi32(base)));
      }
      for (int64_t x = first; x < j; ++x) ++count[cell[x]];
#endif
      for (; j + 4 <= last; j += 4) {
        const int32_t c0 = base + col[sl[j] * row], c1 = base + col[sl[j + 1] * row];
        const int32_t c2 = base + col[sl[j + 2] * row], c3 = base + col[sl[j + 3] * row];
        cell[j] = c0, cell[j + 1] = c1, cell[j + 2] = c2, cell[j + 3] = c3;
        ++count[c0], ++count[c1], ++count[c2], ++count[c3];
      }
      for (; j < last; ++j) ++count[cell[j] = base + col[sl[j] * row]];
    });
  }

  // Runs written = select(b, h, n, lo, m, top, sl, row) for every (request, KV head) with tokens to retrieve
  // (top: the most any head takes, <= m; sl: the slots of positions lo..lo + m; row: the head's output row of
  // R): select writes the slots it retrieves, in position order, and returns how many (> R: an overflow,
  // nothing written past R). Fills the rest with -1. A request is covered (nothing to retrieve) when its least count +
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
          written = select(b, h, n, lo, m, std::min(top, m), sl, row);
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
// threshold (kTie; 3 bytes of padding after the flags for the compaction's 4-byte gathers), the heads that
// cut it (bitmask) and a head's mass; per token its cell; the cells at some head's threshold; the cell
// lists of the top-p search.
struct HistScratch {
  std::vector<int32_t> cell, count, win_count, ties, nonempty, cand, next;
  std::vector<uint32_t> keys, win_keys;
  std::vector<uint8_t> flag;
  std::vector<uint64_t> tie;
  std::vector<double> mass;

  void reserve(int64_t cells, int64_t tokens) {
    if (static_cast<int64_t>(count.size()) < cells)
      count.assign(cells, 0), keys.resize(cells), win_count.resize(cells), win_keys.resize(cells), flag.assign(cells + 3, 0), tie.assign(cells, 0), mass.resize(cells);
    if (static_cast<int64_t>(cell.size()) < tokens) cell.resize(tokens);
  }
};
constexpr uint8_t kWhole = 1, kTie = 2;

using a2ats::ivec;
using a2ats::kLanes;
typedef uint32_t uvec __attribute__((vector_size(4 * kLanes)));

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The keys ordered(row[c]) of one query head's LUT row over the cells [0, n), and the least and greatest of
// them among the cells holding tokens (count > 0). Vectorized (ordered(): flip every bit of a negative
// float, the sign bit of a positive one).
inline std::pair<uint32_t, uint32_t> row_keys(const float* row, const int32_t* count, int64_t n, uint32_t* keys) {
  constexpr uint32_t kMax = std::numeric_limits<uint32_t>::max();
  uvec lo_v = uvec{} + kMax, hi_v = uvec{};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const uvec bits = load<uvec>(row + c);
    const uvec key = bits ^ (reinterpret_cast<uvec>(reinterpret_cast<ivec>(bits) >> 31) | 0x80000000u);
    std::memcpy(keys + c, &key, sizeof(key));
    const uvec held = reinterpret_cast<uvec>(load<ivec>(count + c) != 0);  // all ones where the cell holds tokens
    lo_v = lo_v < (key | ~held) ? lo_v : (key | ~held);
    hi_v = hi_v > (key & held) ? hi_v : (key & held);
  }
  uint32_t lo = kMax, hi = 0;
  for (int l = 0; l < kLanes; ++l) lo = std::min(lo, lo_v[l]), hi = std::max(hi, hi_v[l]);
  for (; c < n; ++c) {
    keys[c] = ordered(row[c]);
    if (count[c]) lo = std::min(lo, keys[c]), hi = std::max(hi, keys[c]);
  }
  return {lo, hi};
}

// The tokens of the cells [0, n) whose key is >= t. Vectorized.
inline int64_t tokens_at_least(const uint32_t* keys, const int32_t* count, int64_t n, uint32_t t) {
  ivec acc0 = ivec{}, acc1 = ivec{};  // sums of at most the request's length
  int64_t c = 0;
  for (; c + 2 * kLanes <= n; c += 2 * kLanes) {
    acc0 += (load<uvec>(keys + c) >= t) & load<ivec>(count + c);
    acc1 += (load<uvec>(keys + c + kLanes) >= t) & load<ivec>(count + c + kLanes);
  }
  acc0 += acc1;
  int64_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += acc0[l];
  for (; c < n; ++c) total += keys[c] >= t ? count[c] : 0;
  return total;
}

// Keeps the cells [0, n) holding tokens with keys in [lo, hi], in order, at the front of (to_keys,
// to_count) (which may be (keys, count) themselves); returns how many, and adds the tokens of keys above hi
// to *above.
inline int64_t keep_window(const uint32_t* keys, const int32_t* count, int64_t n, uint32_t lo, uint32_t hi,
                           uint32_t* to_keys, int32_t* to_count, int64_t* above) {
  int64_t kept = 0, c = 0, over = 0;
#if defined(__AVX512F__)
  const __m512i lo_v = _mm512_set1_epi32(static_cast<int>(lo)), hi_v = _mm512_set1_epi32(static_cast<int>(hi));
  __m512i over_v = _mm512_setzero_si512();
  for (; c + 16 <= n; c += 16) {
    const __m512i k = _mm512_loadu_si512(keys + c), w = _mm512_loadu_si512(count + c);
    over_v = _mm512_mask_add_epi32(over_v, _mm512_cmpgt_epu32_mask(k, hi_v), over_v, w);
    const __mmask16 in = _mm512_cmpge_epu32_mask(k, lo_v) & _mm512_cmple_epu32_mask(k, hi_v) &
                         _mm512_test_epi32_mask(w, w);
    _mm512_storeu_si512(to_keys + kept, _mm512_maskz_compress_epi32(in, k));
    _mm512_storeu_si512(to_count + kept, _mm512_maskz_compress_epi32(in, w));
    kept += __builtin_popcount(in);
  }
  over = _mm512_reduce_add_epi32(over_v);
#endif
  for (; c < n; ++c) {
    const uint32_t k = keys[c];
    const int32_t w = count[c];
    over += k > hi ? w : 0;
    to_keys[kept] = k, to_count[kept] = w;  // in place: kept <= c
    kept += k >= lo && k <= hi && w;
  }
  *above += over;
  return kept;
}

// A query head's threshold over the cells [0, n) by their keys: the greatest t with at least `want` tokens
// at keys >= t (1 <= want <= the cells' tokens; t is then the key of the want-th best token), and the tokens
// above t (< want). Found bit by bit below the bits shared by `range` (the least and greatest key of a cell
// holding tokens, between which t lies), one tokens_at_least pass per bit; every 4 bits the cells still in
// the window t can lie in are copied to (win_keys, win_count) (n long each) and the search goes on over
// them alone, the tokens above the window counted once. The tokens above t are those at >= the least
// candidate that failed.
inline std::pair<uint32_t, int64_t> count_threshold(const uint32_t* keys, const int32_t* count, int64_t n,
                                                    std::pair<uint32_t, uint32_t> range, int64_t want,
                                                    uint32_t* win_keys, int32_t* win_count) {
  const auto [lo, hi] = range;
  const int free_bits = lo == hi ? 0 : 32 - __builtin_clz(lo ^ hi);
  uint32_t t = free_bits == 32 ? 0 : lo & ~((uint32_t{1} << free_bits) - 1);  // <= lo: every token is at >= t
  int64_t above = 0, outside = 0;  // outside: the tokens above the window, left out of (keys, count)
  for (int bit = free_bits - 1; bit >= 0; --bit) {
    if (bit % 4 == 3 && bit < free_bits - 1 && n > 4 * kLanes) {  // t lies in [t, t | (2^(bit+1) - 1)]
      n = keep_window(keys, count, n, t, t | ((uint32_t{2} << bit) - 1), win_keys, win_count, &outside);
      keys = win_keys, count = win_count;
    }
    const uint32_t candidate = t | (uint32_t{1} << bit);
    const int64_t at_least = candidate > hi ? 0 : outside + tokens_at_least(keys, count, n, candidate);
    if (at_least >= want) t = candidate;
    else above = at_least;
  }
  return {t, above};
}

// Marks the cells [0, n) one query head (bit g) takes: kWhole where its key is above the head's threshold t
// (a vectorized pass; empty cells too, harmlessly), and for the cells holding tokens at t, kTie and bit g of
// their tie mask, each such cell listed in `ties` once (found by 64-cell chunks: there are few).
inline void mark_cells(const uint32_t* keys, const int32_t* count, int64_t n, uint32_t t, int g, uint8_t* flag,
                       uint64_t* tie, std::vector<int32_t>& ties) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) flag[c] |= keys[c] > t ? kWhole : 0;
  for (int64_t c0 = 0; c0 < n; c0 += 64) {
    const int64_t c1 = std::min(n, c0 + 64);
    int any = 0;
    for (int64_t c = c0; c < c1; ++c) any |= keys[c] == t;
    if (!any) continue;
    for (int64_t c = c0; c < c1; ++c) {
      if (keys[c] != t || !count[c]) continue;
      if (!(flag[c] & kTie)) ties.push_back(static_cast<int32_t>(c));
      flag[c] |= kTie;
      tie[c] |= uint64_t{1} << g;
    }
  }
}

// The threshold of the cells in `cells` by their keys, largest first, weighted by weight[c] (a head's
// estimated softmax mass): the key t with (weight of keys > t) < want <= (weight of keys >= t). A radix
// select whose digits adapt to the keys' range: each level bins [min, max] of the remaining keys into
// 2^kBinBits and keeps the bin where `want` is reached; `range`: the min and max key of `cells`. Returns t
// and the weight above it, and leaves the cells of key t in `cells`.
constexpr int kBinBits = 11;
std::pair<uint32_t, double> mass_threshold(const uint32_t* keys, const double* weight, std::vector<int32_t>& cells,
                                           std::vector<int32_t>& next, std::pair<uint32_t, uint32_t> range,
                                           double want) {
  double above_weight = 0;
  for (auto [lo, hi] = range;;) {
    if (lo >= hi) return {lo, above_weight};  // one key left: the threshold
    const int shift = std::max(0, 32 - __builtin_clz(hi - lo) - kBinBits);
    double hist[1 << kBinBits] = {0};
    for (int32_t c : cells) hist[(keys[c] - lo) >> shift] += weight[c];
    uint32_t bin = (hi - lo) >> shift;
    for (; bin > 0; --bin) {
      if (above_weight + hist[bin] >= want) break;
      above_weight += hist[bin];
    }
    next.clear();
    uint32_t next_lo = std::numeric_limits<uint32_t>::max(), next_hi = 0;
    for (int32_t c : cells) {
      if ((keys[c] - lo) >> shift != bin) continue;
      next.push_back(c);
      next_lo = std::min(next_lo, keys[c]), next_hi = std::max(next_hi, keys[c]);
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
  const auto [threshold, above_mass] = mass_threshold(keys, mass.data(), cand, next, range, target);
  int64_t above = 0, at = 0;
  for (int32_t c : nonempty) {
    if (keys[c] > threshold) above += count[c];
    else if (keys[c] == threshold) at += count[c];
  }
  const double w = std::exp(static_cast<double>(row[cand.front()]) - mx);
  const int64_t need = std::clamp<int64_t>(static_cast<int64_t>(std::ceil((target - above_mass) / w)), 1, at);
  return std::min(std::max(above + need, least), most);
}

// Step 3 of retrieve_hist_cpu: the slots sl[i] of the positions i < m whose cell (cell[i]) a query head
// takes, in position order, into row[0:R); returns how many (> R: an overflow, nothing written past R). A
// position is taken when some head takes its cell whole (kWhole), and a position of a cell at the
// threshold of heads (kTie, heads in tie[c]) counts against each of those heads that still needs tokens
// (need[g], decremented), taken if any did: ties go to the earlier position. With AVX-512, 16 positions
// at a time: their flags by one gather, the taken slots by compress-stores; a block holding a tie cell,
// and the tail, go one position at a time.
int64_t compact_cells(const int32_t* cell, const int64_t* sl, int64_t m, const uint8_t* flag, const uint64_t* tie,
                      int64_t* need, int64_t* row, int64_t R) {
  auto take = [&](int64_t i) {
    const int32_t c = cell[i];
    const uint8_t f = flag[c];
    bool taken = f & kWhole;
    if (f & kTie) [[unlikely]] {
      for (uint64_t t = tie[c]; t; t &= t - 1) {
        const int g = __builtin_ctzll(t);
        if (need[g] > 0) {
          --need[g];
          taken = true;
        }
      }
    }
    return taken;
  };
  int64_t written = 0, i = 0;
#if defined(__AVX512F__)
  const __m512i whole = _mm512_set1_epi32(kWhole), at_threshold = _mm512_set1_epi32(kTie);
  for (; i + 16 <= m; i += 16) {
    // 4 bytes at flag + cell each (the flags are padded): the low byte is the cell's
    const __m512i f = _mm512_i32gather_epi32(_mm512_loadu_si512(cell + i), flag, 1);
    if (_mm512_test_epi32_mask(f, at_threshold)) [[unlikely]] {
      written += Selection::compact(sl + i, 16, row + written, R - written, [&](int64_t j) { return take(i + j); });
      continue;
    }
    const __mmask16 taken = _mm512_test_epi32_mask(f, whole);
    for (int half = 0; half < 2; ++half) {  // no branch on the mask: ~1 position in 10 is taken, unpredictably
      const __mmask8 lanes = static_cast<__mmask8>(taken >> (8 * half));
      const int count = __builtin_popcount(lanes);
      const __mmask8 fits = written + count <= R ? static_cast<__mmask8>((1u << count) - 1) : 0;
      _mm512_mask_storeu_epi64(row + written, fits, _mm512_maskz_compress_epi64(lanes, _mm512_loadu_si512(sl + i + 8 * half)));
      written += count;
    }
  }
#endif
  return written + Selection::compact(sl + i, m - i, row + written, R - written, [&](int64_t j) { return take(i + j); });
}

}  // namespace

void retrieve_topk_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
                       torch::Tensor k, torch::Tensor bounds, int64_t sinks, int64_t window, torch::Tensor out) {
  const Selection sel(lut, codes, slots, seq_lens, k, 0.0, 0, bounds, sinks, window, out);  // fixed budgets only
  sel.run([&](int64_t b, int64_t h, int64_t n, int64_t lo, int64_t m, int64_t want, const int64_t* sl, int64_t* row) {
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
    return Selection::compact(sl, m, row, sel.R, [taken](int64_t i) { return taken[i] != 0; });
  });
}

void retrieve_hist_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
                       torch::Tensor k, double top_p, int64_t min_tokens, torch::Tensor bounds, int64_t sinks,
                       int64_t window, torch::Tensor out) {
  const Selection sel(lut, codes, slots, seq_lens, k, top_p, min_tokens, bounds, sinks, window, out);
  TORCH_CHECK(sel.G <= 64, "at most 64 query heads per KV head");
  const int64_t NC = sel.NB * sel.C;
  sel.run([&](int64_t b, int64_t h, int64_t n, int64_t lo, int64_t m, int64_t top, const int64_t* sl, int64_t* row) {
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
    // 1. each scorable token's cell and the tokens per cell, in the cells [0, used) its buckets reach
    const int64_t used = sel.count_cells(b, h, n, lo, lo + m, cell, count);
    if (sel.top_p > 0.0) {
      s.nonempty.clear();
      for (int32_t c = 0; c < used; ++c)
        if (count[c]) s.nonempty.push_back(c);
    }
    // 2. each query head's threshold over the cells: whole cells above it, a tie group at it
    int64_t need[64];
    s.ties.clear();
    for (int64_t g = 0; g < sel.G; ++g) {
      const float* row = sel.lut + (b * sel.Hq + h * sel.G + g) * NC;
      const auto range = row_keys(row, count, used, keys);
      const int64_t want = sel.top_p > 0.0 ? top_p_tokens(row, s.nonempty, count, keys, range, s.mass, s.cand, s.next,
                                                          sel.top_p, std::min(sel.min_tokens, top), top)
                                            : top;
      const auto [threshold, above] = count_threshold(keys, count, used, range, want, s.win_keys.data(), s.win_count.data());
      need[g] = want - above;
      mark_cells(keys, count, used, threshold, static_cast<int>(g), flag, tie, s.ties);
    }
    // 3. one pass in position order: the union, ties to the earlier position
    const int64_t written = compact_cells(cell, sl, m, flag, tie, need, row, sel.R);
    std::fill(count, count + used, 0);
    std::fill(flag, flag + used, 0);
    for (int32_t c : s.ties) tie[c] = 0;
    return written;
  });
}
