"""Reward modelling (Step 2): ensembles, their training loop, losses, evaluation and metrics."""
