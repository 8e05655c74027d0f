"""Evaluation: metrics (pure functions), loaders and runs."""
