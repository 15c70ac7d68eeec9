"""Adaptation tasks with real data, for the demo and the benchmarks (offline, from installed packages)."""
