// CPU sparse decode attention: one pass over the selected K/V rows.
//
// For each (request, KV head) the g query heads of the group share every K and V row
// they read: scores, online softmax and the weighted V sum happen while the row is in
// cache, so K and V are streamed once (the torch reference gathers them into a copy
// first). Parallel over (request, KV head) with ATen's thread pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
void attend(const float* q, const T* k, const T* v, const int64_t* slots, float* out, float* lse, int64_t B,
            int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t Dv, int64_t ksn, int64_t ksh, int64_t vsn,
            int64_t vsh, float scale, float cap) {
  const int64_t G = Hq / Hkv;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(G * D), m(G), l(G), acc(G * Dv), kr(D), vr(Dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qs[g * D + d] = qg[d] * scale;
        m[g] = neg_inf;
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t* sl = slots + bh * S;
      constexpr int64_t kAhead = 8;  // rows are scattered: prefetch a few ahead to hide memory latency
      for (int64_t j = 0; j < S; ++j) {
        if (j + kAhead < S && sl[j + kAhead] >= 0) {
          __builtin_prefetch(k + sl[j + kAhead] * ksn + h * ksh);
          __builtin_prefetch(v + sl[j + kAhead] * vsn + h * vsh);
        }
        const int64_t slot = sl[j];
        if (slot < 0) continue;
        const T* kp = k + slot * ksn + h * ksh;
        const T* vp = v + slot * vsn + h * vsh;
        for (int64_t d = 0; d < D; ++d) kr[d] = static_cast<float>(kp[d]);
        for (int64_t d = 0; d < Dv; ++d) vr[d] = static_cast<float>(vp[d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qs.data() + g * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kr[d];
          if (cap > 0.f) s = cap * std::tanh(s / cap);
          float* ag = acc.data() + g * Dv;
          if (s > m[g]) {
            const float alpha = std::exp(m[g] - s);  // 0 on the first row (m = -inf)
            l[g] *= alpha;
            for (int64_t d = 0; d < Dv; ++d) ag[d] *= alpha;
            m[g] = s;
          }
          const float p = std::exp(s - m[g]);
          l[g] += p;
          for (int64_t d = 0; d < Dv; ++d) ag[d] += p * vr[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* og = out + (b * Hq + h * G + g) * Dv;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < Dv; ++d) og[d] = acc[g * Dv + d] * inv;
        lse[b * Hq + h * G + g] = l[g] > 0.f ? m[g] + std::log(l[g]) : neg_inf;
      }
    }
  });
}

}  // namespace

// q f32 [B, Hq, D] contiguous; k [N, Hkv, D], v [N, Hkv, Dv] (f32/bf16/f16, last dim contiguous);
// slots i64 [B, Hkv, S] contiguous (-1 = padding). Returns (out f32 [B, Hq, Dv], lse f32 [B, Hq]).
std::vector<torch::Tensor> sparse_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                                            double scale, double cap) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && slots.dim() == 3, "expected 3-d tensors");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && slots.scalar_type() == torch::kLong, "q must be f32, slots i64");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v dtypes differ");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k/v last dim must be contiguous");
  q = q.contiguous();
  slots = slots.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), Dv = v.size(2), S = slots.size(2);
  TORCH_CHECK(k.size(2) == D && slots.size(0) == B && slots.size(1) == Hkv && Hq % Hkv == 0, "shape mismatch");
  auto out = torch::empty({B, Hq, Dv}, q.options());
  auto lse = torch::empty({B, Hq}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "a2ats_sparse_attention", [&] {
    attend<scalar_t>(q.data_ptr<float>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
                     out.data_ptr<float>(), lse.data_ptr<float>(), B, Hq, Hkv, S, D, Dv, k.stride(0), k.stride(1),
                     v.stride(0), v.stride(1), static_cast<float>(scale), static_cast<float>(cap));
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("sparse_attention", &sparse_attention, "A2ATS CPU sparse decode attention"); }
