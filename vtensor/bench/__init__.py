"""Benchmark scripts (``vtensor bench ...``): each prints a table and can write JSON."""
