"""One training run on a loaded base: SFT, DPO, evaluation, pruning reports, W&B tracking."""
