"""Kernels of the decode hot path (installed as ``a2ats_sglang.kernels``).

Triton: ``retrieve`` (one layer's retrieval in four launches: WRoPE + lookup
table, cell histogram, per-head thresholds, the union pass), ``sparse_decode``
(split-K attention over per-KV-head slot lists), ``merge`` (log-sum-exp reduction
of partial results). They run on CUDA, and on CPU tensors under
``TRITON_INTERPRET=1`` (how the tests check them against the torch references).
C++ (``cpu``): the same retrieval and attention on CPU, one native call per layer.
``dispatch`` chooses one implementation per server.
"""
