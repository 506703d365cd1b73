"""Kernels of the decode hot path (installed as ``a2ats_sglang.kernels``).

Triton: ``score`` (LUT gather + sink/window mask), ``sparse_decode`` (split-K
attention over per-KV-head slot lists), ``merge`` (log-sum-exp reduction of
partial results). They run on CUDA, and on CPU tensors under
``TRITON_INTERPRET=1`` (how the tests check them against the torch references).
"""
