"""Benchmarks of fastopt against stock PyTorch and peers (not part of the test suite)."""
