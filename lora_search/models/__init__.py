"""Base models and adapters: loaders (embedded GGUF, hub, tiny), LoRA target presets and configs, the memory estimate."""
