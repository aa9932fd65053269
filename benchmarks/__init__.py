"""Benchmark scripts: each prints its figures, its headline ratio last."""
