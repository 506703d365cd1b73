"""Harness code, not on the serving path: the embedded default model, a real server
launcher (demo, examples, tests, benchmarks) and the demo."""
