"""The experiment: backbone and feature cache, adapter training, Optuna sweep, results."""
