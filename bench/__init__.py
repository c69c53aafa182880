"""Reproducible benchmarks: declarative scenarios that write Markdown tables to bench/results/."""
