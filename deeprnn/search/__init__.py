"""Hyperparameter search: ``space`` (a space of configuration values and the trials of a grid or random search),
``optuna_study`` (the same space as an adaptive Optuna study, with its sampler and pruner) and ``ranking`` (the
trials ranked by held-out perplexity, as CSV and markdown tables)."""
