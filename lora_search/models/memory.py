"""Peak memory of a LoRA training run, estimated from its configuration and the model's architecture alone.

It predicts what a run records as `peak_memory_mb` (hardware.PeakMemory around training and the final eval): on CUDA
the max allocated memory, on the CPU the process's peak RSS, which also holds the Python/torch runtime and what
glibc's heap keeps. Every term counts bytes: weights by quant mode and dtype, the adapter with its gradients and
optimizer state, what autograd saves per token in a Llama-style block, the LM head's logit tiles. The constants
measured on a machine are named below; benchmarks/memory_estimate.py measures the whole against real runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil
import torch

from lora_search.config.schema import RunConfig
from lora_search.core import hardware
from lora_search.models.adapters import target_modules
from lora_search.models.loaders import meta_model

MB = 2**20
# CPU, fitted to 47 runs of SmolLM2-135M (3, 10 and 40 steps; benchmarks/memory_estimate.py) on x86-64 Linux,
# torch 2.13, the other terms as they are:
# RSS outside every tensor counted below: the worker before its model loads (Python, torch, transformers, peft, trl,
# datasets, optuna, the data: 539 MB measured, rss_before_load_mb), the Trainer and what the first step loads
# (accelerate, oneDNN, autograd threads: ~140 MB measured), the heap's own baseline;
RUNTIME_CPU_MB = 750.0
# the pages glibc's heap keeps of freed per-layer temporaries (fragmentation), in decoder layers' worth of saved
# activations (a forward alone, measured, leaves 5-16 such layers of a 30-layer model in the RSS);
HEAP_SLACK_LAYERS = 3.5
# and under bf16 autocast, the RSS that steps add and later steps do not give back (heap pages and oneDNN kernels
# around the half-precision weight copies autocast makes and frees every step, at each new padded batch shape): a
# share of those copies' bytes, growing like the square root of the step count (a random walk's high-water mark;
# measured at 3, 10 and 40 steps on SmolLM2; none in fp32 or on the tiny model).
CREEP_PER_SQRT_STEP = 0.5
STEPS_IF_EPOCHS = 100  # trainer.max_steps=-1: the step count depends on the data; assume this many
# Bytes of optimizer state per trainable parameter (transformers' `optim` names; the first prefix that matches).
OPTIMIZER_STATE = (("adamw_8bit", 2), ("paged_adamw_8bit", 2), ("adamw_bnb_8bit", 2), ("adam8bit", 2),
                   ("lion_8bit", 1), ("paged_lion_8bit", 1), ("lion", 4), ("paged_lion", 4), ("sgd", 0),
                   ("adafactor", 0), ("adagrad", 4), ("rmsprop", 4))  # else AdamW-like: 8 (two fp32 moments)
VOCAB_TILE, TOKEN_TILE = 32768, 4096  # TRL's fused LM head projects [tokens, vocab] tiles of at most this size
TILE_TEMPS_CPU = 24  # bytes per tile element of fp32 temporaries its torch (non-Triton) backward keeps alive
_cache: dict[str, dict] = {}


@dataclass
class Estimate:
    total_mb: float  # the predicted peak, MB (2**20 bytes)
    parts: dict[str, float]  # named components in MB, summing to total_mb

    def describe(self) -> str:
        """One line: the total and its parts."""
        return f"{self.total_mb:.0f} MB ({', '.join(f'{k} {v:.0f}' for k, v in self.parts.items())})"


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _bytes(dtype) -> int:
    return torch.empty(0, dtype=getattr(torch, str(dtype).replace("torch.", ""))).element_size()


def _shapes(arch) -> dict:
    """What the estimate needs from the architecture, read once off the meta-device module tree (no weights)."""
    key = arch.to_json_string()
    if key not in _cache:
        model = meta_model(arch)
        modules, head = dict(model.named_modules()), model.get_output_embeddings()
        text = arch.get_text_config() if hasattr(arch, "get_text_config") else arch
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        _cache[key] = {
            # (owning module, a Linear's weight?, numel, the LM head?): tied weights once
            "params": [(n.rsplit(".", 1)[0], isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.Linear)
                        and n.endswith("weight"), p.numel(), modules[n.rsplit(".", 1)[0]] is head)
                       for n, p in model.named_parameters()],
            "buffers": sum(b.numel() * b.element_size() for b in model.buffers()),
            "adaptable": [(n, m.in_features, m.out_features, m.bias is not None) if isinstance(m, torch.nn.Linear)
                          else (n, m.num_embeddings, m.embedding_dim, False) for n, m in modules.items()
                          if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))],
            "module_params": {n: sum(p.numel() for p in m.parameters()) for n, m in modules.items() if n},
            "hidden": text.hidden_size, "inter": text.intermediate_size, "layers": text.num_hidden_layers,
            "heads": heads, "q_dim": heads * head_dim, "vocab": text.vocab_size,
            "kv_dim": (getattr(text, "num_key_value_heads", None) or heads) * head_dim,
            "stored": _bytes(getattr(arch, "dtype", None) or "float32"),  # the checkpoint's dtype
        }
    return _cache[key]


def _weight_bytes(cfg: RunConfig, device: str) -> int:
    """Bytes per weight as models.load_base loads them (model.dtype auto: bf16/fp16 on a GPU, fp32 on the CPU)."""
    return (2 if device == "cuda" else 4) if cfg.model.dtype == "auto" else _bytes(cfg.model.dtype)


def _mixed(cfg: RunConfig, device: str) -> bool:
    """Whether training autocasts to bf16/fp16 (trainer.precision as hardware.precision resolves it)."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision in ("bf16", "fp16")

    return device == "cuda" or hardware.cpu_has_bf16()


def _quantized(name: str, is_linear: bool, is_head: bool, q) -> bool:
    """Whether bitsandbytes quantizes this module's weight (transformers' skip-module rule; the head never)."""
    if q.mode == "none" or not is_linear or is_head:
        return False
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, list(q.skip_modules))
    except ImportError:
        return not any(name == p or name.endswith("." + p) for p in q.skip_modules)


def base_mb(cfg: RunConfig, arch, device: str | None = None) -> float:
    """The base model's weights in memory under cfg.quant.mode and the dtype it loads in (a budget's floor)."""
    s, q = _shapes(arch), cfg.quant
    wbytes, total = _weight_bytes(cfg, _device(device)), s["buffers"]
    outs = {name: fan_out for name, _, fan_out, _ in s["adaptable"]}
    for owner, is_linear, n, is_head in s["params"]:
        if _quantized(owner, is_linear, is_head, q):
            if q.mode == "int8":
                total += n + 4 * outs[owner]  # int8 weights and one fp32 scale per output row
            else:  # two 4-bit weights a byte; an absmax per 64 (fp32, or uint8 + an fp32 per 256 with double quant);
                # the 16-value code, and the nested quantization's 256-value code
                total += n / 2 + (n / 64 + n / 64 / 256 * 4 + 256 * 4 if q.double_quant else n / 64 * 4) + 16 * 4
        else:  # prepare_model_for_kbit_training casts every unquantized weight of a quantized model to fp32
            total += n * (4 if q.mode != "none" else wbytes)
    return total / MB


def _modules(cfg: RunConfig, s: dict):
    """(name, in, out, bias?, rank) of every module the adapter wraps, matched as PEFT matches them."""
    lora, targets = cfg.lora, target_modules(cfg.lora, cfg.model)
    layers = set(lora.layers_to_transform or [])
    for name, fan_in, fan_out, bias in s["adaptable"]:
        index = re.search(r"\.(\d+)\.", name)
        if any(name == t or name.endswith("." + t) for t in targets) and \
                (not layers or (index is not None and int(index.group(1)) in layers)):
            rank = next((r for k, r in lora.rank_pattern.items() if re.match(rf"(.*\.)?({k})$", name)), lora.r)
            yield name, fan_in, fan_out, bias, rank


def lora_parameters(cfg: RunConfig, arch) -> int:
    """Trainable parameters of cfg.lora on this model, as PEFT counts them (no model built)."""
    s, lora = _shapes(arch), cfg.lora
    total = 0
    for _, fan_in, fan_out, bias, rank in _modules(cfg, s):
        total += rank * (fan_in + fan_out)  # A: r x in, B: out x r
        total += fan_out * (lora.use_dora + (bias and lora.bias == "lora_only"))  # DoRA magnitude; LoRA biases
    if lora.bias == "all":
        total += sum(fan_out for _, _, fan_out, bias in s["adaptable"] if bias)
    for module in lora.modules_to_save or []:  # a full trainable copy of each
        total += sum(n for name, n in s["module_params"].items() if name == module or name.endswith("." + module))
    return total


def estimate(cfg: RunConfig, arch, device: str | None = None, seq_len: int | None = None,
             completion_len: float | None = None) -> Estimate:
    """Predicted peak memory of one training run of cfg on `arch` (optional: the data's longest tokenized row and
    mean completion tokens per row; without them every row is trainer.max_length tokens, all of them scored)."""
    dev, s, t, q = _device(device), _shapes(arch), cfg.trainer, cfg.quant
    h, inter, qd, heads, L, vocab = s["hidden"], s["inter"], s["q_dim"], s["heads"], s["layers"], s["vocab"]
    wbytes, mixed, cpu = _weight_bytes(cfg, dev), _mixed(cfg, dev), dev != "cuda"
    a = 2 if mixed else wbytes  # matmul outputs: autocast's half precision, or the weights' dtype
    rb = 4 if q.mode != "none" else wbytes  # residual stream: kbit preparation keeps embeddings and norms in fp32
    mlp_b = rb if q.mode in ("nf4", "fp4") else a  # bitsandbytes' 4-bit layers return their input's dtype
    # Rows are padded per batch to its longest row: max_length bounds it, the data's longest row is closer.
    S = t.max_length if t.packing or not seq_len else min(seq_len, t.max_length)
    C = min(completion_len or S, S)  # positions with a label, per row
    rows = t.batch_size * (2 if t.method == "dpo" else 1)  # DPO: chosen and rejected rows in one batch
    tokens = rows * S
    # Bytes autograd saves per token per decoder layer (checked with saved_tensors_hooks in the tests):
    kv = qd if rows > 1 else s["kv_dim"]  # with a padding mask, transformers repeats k and v to every query head
    layer = 2 * rb * h  # the block's input and mid-block residual (each RMSNorm saves its input)
    layer += 3 * mlp_b * inter  # MLP: gate, act(gate), up
    if cfg.model.attn_implementation == "eager":
        layer += a * (qd + 2 * kv) + heads * S * (4 + a)  # q, k, v; the softmax output (fp32) and its cast
    else:
        layer += a * (2 * qd + 2 * kv) + 4 * heads + a * S  # sdpa: q, k, v, output, logsumexp; a mask row
    dora = 0
    for name, fan_in, fan_out, _, rank in _modules(cfg, s):  # the adapter's layers, spread over the blocks
        in_b = a if name.endswith("o_proj") else mlp_b if name.endswith("down_proj") else rb  # their inputs' dtype
        per = fan_in * ((in_b if cpu else 1) if cfg.lora.dropout > 0 else 0)  # dropout mask (CPU: input dtype)
        per += a * (fan_in + rank)  # A's input (dropped-out x, in compute dtype) and B's input
        per += a * fan_out if cfg.lora.use_dora else 0  # DoRA rescales the base output by its magnitude
        layer += per / L
        dora += a * fan_in * fan_out if cfg.lora.use_dora else 0  # and saves W + BA for its norm, once per step
    # autocast's half-precision copies of full-precision base weights, saved for the backward of each matmul
    # (bitsandbytes' layers save their quantized weights and dequantize again in the backward)
    copied = a * sum(n for o, lin, n, head in s["params"] if lin and not head) if mixed and wbytes > a else 0
    casts = copied if q.mode == "none" else 0
    casts += dora
    if t.gradient_checkpointing:  # only each block's input is kept; one block at a time is recomputed
        saved = tokens * (L * rb * h + layer) + casts / L
    else:
        saved = tokens * L * layer + casts
    # TRL's fused LM head: [tokens, vocab] tiles over the scored positions (compact_lm_head: completions only), its
    # saved input and gradient; the head's weight tile cast to the compute dtype
    scored = rows * (C if t.compact_lm_head else S)
    logits = min(scored, TOKEN_TILE) * min(vocab, VOCAB_TILE) * (a + (TILE_TEMPS_CPU if cpu else 0))
    logits += scored * h * (rb + 4) + (min(vocab, VOCAB_TILE) * h * a if mixed and wbytes > a else 0)
    if t.method == "dpo":  # after training, dpo.pair_logps scores eval pairs with full logits and log_softmax:
        scoring = 2 * max(1, t.eval_batch_size // 2) * S * vocab * ((a if mixed else 0) + 4 + 4)
        # on top of what the heap kept of training (CPU), or once training's activations are freed (CUDA)
        logits = max(logits, scoring if cpu else scoring - saved)
    steps = (t.max_steps if t.max_steps > 0 else STEPS_IF_EPOCHS) * t.gradient_accumulation_steps
    parts = {"runtime": RUNTIME_CPU_MB if cpu else 0.0,
             "base_weights": base_mb(cfg, arch, dev) + _mapped_checkpoint(cfg, s, dev) / MB,
             "lora": lora_parameters(cfg, arch) * (4 + 4 + _optimizer_bytes(t.optim)) / MB,  # weights, grads, state
             "activations": saved / MB,
             "logits": logits / MB}
    if cpu:
        parts["heap"] = (tokens * layer * HEAP_SLACK_LAYERS + CREEP_PER_SQRT_STEP * copied * steps**0.5) / MB
    return Estimate(total_mb=sum(parts.values()), parts=parts)


def _optimizer_bytes(optim: str) -> int:
    return next((b for prefix, b in OPTIMIZER_STATE if optim.startswith(prefix)), 8)


def _mapped_checkpoint(cfg: RunConfig, s: dict, device: str) -> float:
    """CPU, quantized, checkpoint already in the load dtype: the file stays mapped (its unquantized tensors are
    views into it), so the pages quantization read stay resident: the quantized weights' originals."""
    if device == "cuda" or cfg.quant.mode == "none" or s["stored"] != _weight_bytes(cfg, device):
        return 0.0  # else the checkpoint was converted while loading: copies, and the file was closed
    return sum(n * s["stored"] for o, lin, n, head in s["params"] if _quantized(o, lin, head, cfg.quant))


def auto_budget_mb(device: str | None = None) -> float:
    """sweep.memory_budget_mb=auto: free GPU memory, or on the CPU available memory plus this process's RSS."""
    if _device(device) == "cuda":
        return torch.cuda.mem_get_info()[0] / MB

    return (psutil.virtual_memory().available + psutil.Process().memory_info().rss) / MB


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is an out-of-memory error: CUDA's, MemoryError, the CPU
    allocator's."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            return True
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and any(s in text for s in (
                "out of memory", "can't allocate memory", "defaultcpuallocator", "cublas_status_alloc_failed")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
