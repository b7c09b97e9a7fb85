"""Benchmark scripts (each prints a table; --json PATH writes its rows); report.py renders them."""
