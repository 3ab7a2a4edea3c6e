"""Hyperparameter search: ``space`` (a space of configuration values, and the points of a grid or random search),
``optuna_study`` (every sweep as an Optuna study: its sampler, pruner and storage, a journal file checked, a grid or
random sweep's points enqueued), ``study_orphans`` (trials whose process is gone) and
``ranking`` (the trials ranked by held-out perplexity, as CSV and markdown tables)."""
