"""What a user runs: the pipeline, the pre-Hydra checks, the train stage, nightly, preview, dashboard."""
