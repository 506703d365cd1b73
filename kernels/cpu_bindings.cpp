// Python bindings of the CPU kernels (one extension module: a2ats_sglang.kernels.cpu builds it).
#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_attention", &sparse_attention, "A2ATS CPU sparse decode attention");
  m.def("retrieve_topk", &retrieve_topk_cpu, "A2ATS CPU retrieval by per-head top-K over tokens (baseline)");
  m.def("retrieve_layer", &retrieve_layer_cpu, "A2ATS CPU retrieval of one layer: WRoPE, LUT, selection");
  m.def("decode_layer", &decode_layer_cpu, "A2ATS CPU sparse decode layer: WRoPE, LUT, selection, attention");
}
