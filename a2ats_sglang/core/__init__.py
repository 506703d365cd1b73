"""The A2ATS method, independent of SGLang: RoPE as an explicit rotation, query-aware
vector quantization, the codebooks file, retrieval (WRoPE queries, lookup table,
selection) and exact sparse attention with log-sum-exp merging (torch references)."""
