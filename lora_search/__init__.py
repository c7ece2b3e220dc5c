"""lora_search: LoRA/QLoRA hyperparameter sweeps with Hydra, Optuna, TRL, PEFT and W&B."""

__version__ = "0.1.0"
