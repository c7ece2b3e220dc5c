"""The Optuna study: sampler and pruner, the objective that trains trials, failures, memory budget, progress."""
