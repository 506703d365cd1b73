// Python bindings of the CPU kernels (one extension module: a2ats_sglang.kernels.cpu builds it).
#include "cpu_kernels.h"
#include "cpu_vec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("encode_keys", &encode_keys, "A2ATS CPU key encoding: un-rotated, nearest whitened centroid, stored at its slot");
  m.def("sparse_attention", &sparse_attention, "A2ATS CPU sparse decode attention");
  m.def("paged_attention", &paged_attention, "A2ATS CPU dense decode attention over a slot table");
  m.def("retrieve_topk", &retrieve_topk_cpu, "A2ATS CPU retrieval by per-head top-K over tokens (baseline)");
  m.def("retrieve_layer", &retrieve_layer_cpu, "A2ATS CPU retrieval of one layer: WRoPE, LUT, selection");
  // the work (multiply-adds) below which a kernel runs on the calling thread, and what one token of one KV
  // head counts for in the selection: the tests size their inputs to cover both paths
  m.attr("serial_work") = a2ats::kSerialWork;
  m.attr("select_token_work") = kSelectTokenWork;
  m.def("decode_layer", &decode_layer_cpu, "A2ATS CPU sparse decode layer: WRoPE, LUT, selection, attention");
}
