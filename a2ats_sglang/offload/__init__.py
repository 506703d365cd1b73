"""Offload mode's parts: shared host memory, the host KV pool and its sizing, the
device-side resident window, and the CPU attention worker (process, wire format, client)."""
