"""Plain helper functions shared by the tests (importable as ``support`` through
pytest's ``pythonpath = ["tests"]``). Fixtures live in tests/conftest.py; no test
module imports another test module or conftest."""
