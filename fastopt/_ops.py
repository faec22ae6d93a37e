"""Placeholder until the compiled-op loader lands (owned by the CPU backend work)."""

LOAD_ERROR = "fastopt._C not built"
