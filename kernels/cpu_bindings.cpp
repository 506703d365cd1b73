// Python bindings of the CPU kernels (one extension module: a2ats_sglang.kernels.cpu builds it).
#include <torch/extension.h>


void sparse_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots, double scale,
                      double cap, torch::Tensor out, torch::Tensor lse);
void retrieve_hist_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
                       torch::Tensor k, torch::Tensor bounds, int64_t sinks, int64_t window, torch::Tensor out);
void retrieve_topk_cpu(torch::Tensor lut, torch::Tensor codes, torch::Tensor slots, torch::Tensor seq_lens,
                       torch::Tensor k, torch::Tensor bounds, int64_t sinks, int64_t window, torch::Tensor out);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_attention", &sparse_attention, "A2ATS CPU sparse decode attention");
  m.def("retrieve", &retrieve_hist_cpu, "A2ATS CPU retrieval from the LUT's cell histogram: thresholds, GQA union");
  m.def("retrieve_topk", &retrieve_topk_cpu, "A2ATS CPU retrieval by per-head top-K over tokens (baseline)");
}
