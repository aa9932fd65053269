"""Optuna over ranks: the sweep, the Pareto search, many workers and their storage, records."""
