"""Offline calibration: run a model over text, capture its pre-RoPE keys and queries,
fit query-aware VQ codebooks, write the codebooks file (``python -m a2ats_sglang.calibration``)."""
