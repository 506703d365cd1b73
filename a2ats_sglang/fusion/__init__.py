"""A³ chunk-KV fusion: reuse each document's KV at any position, recompute what the question needs."""
