"""Training throughput and peak memory of one lora_search trial against a plain TRL SFTTrainer script with
the same config (model, data, LoRA settings, learning rate, batch size, steps, eval cadence, seed).

Arms, each in its own process (so its peak memory is its own), in alternating order, `--repeats` times:

  trl          the plain script: from_pretrained of the model folder, get_peft_model(LoraConfig), TRL's
               SFTTrainer with TRL's defaults for whatever the config leaves open (padded batches, bf16
               autocast), an eval of the whole eval set every eval_every steps
  lora_search  lora_search.train.run.train_adapter on a Worker, as a sweep trial runs it (the base loaded once,
               precision auto, padding-free batches with flash attention, evals of the fixed eval subset)
  ablations    lora_search with one choice flipped, to record what that choice is worth:
    padding_free trainer.padding_free=true (forced on: with sdpa, a block mask over the whole batch)
    padded       trainer.padding_free=false (where auto turned it on: flash attention)
    full_lm_head trainer.compact_lm_head=false (TRL's fused LM head over every position, as TRL runs it
                 where Triton does not: CPU; on CUDA TRL already scores the completion positions only)
    fp32         trainer.precision=fp32 (no bf16 autocast; CPU: bf16 is used where it has AVX512-BF16/AMX)
    threads1     trainer.num_threads=1 (torch's default is one thread per core)

On a CUDA GPU the model is Llama-shaped with about 1.1B parameters (TinyLlama's shape, random weights
from a config, the byte-level tokenizer of the tiny test model), in bf16 and with an nf4 (QLoRA) base:
arms trl, lora_search, trl_nf4, lora_search_nf4, padding_free; tokens/s and LoRA-adjusted model FLOPs
utilisation (MFU) are reported.

Every process runs its trial twice on the same seeded batches and times the second: kernels for every
batch shape are then built, as they are for a sweep's later trials in a long-lived worker. Tokens are the
non-padding tokens trained on; tokens/s is over optimizer steps only (evals and set-up excluded), with
the first `--skip-steps` steps of the timed run left out.

  .venv/bin/python benchmarks/throughput.py            # embedded SmolLM2 on CPU (llama1b on CUDA)
  .venv/bin/python benchmarks/throughput.py --quick    # tiny model, 4 steps (seconds; the tests use it)

Options: --model (embedded | llama1b | tiny), --arms, --repeats, --steps, --batch-size, --skip-steps,
--cache-dir, --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

log = logging.getLogger("throughput")
NAME = "throughput"
TARGET_CPU, TARGET_GPU = 1.0, 1.3  # lora_search tokens/s over plain TRL's

# The trial every arm trains: a mid-range point of sweeps/rank_lr.yaml's space.
PARAMS = {"lora.r": 16, "lora.alpha_ratio": 2, "lora.dropout": 0.05, "lora.targets": "attn",
          "trainer.learning_rate": 1e-3}

# What each arm changes: overrides composed on top of the model's, and which code trains it.
ARMS = {
    "trl": {"runner": "trl", "overrides": [], "what": "plain TRL SFTTrainer script, TRL's defaults"},
    "lora_search": {"runner": "ours", "overrides": [], "what": "a lora_search trial (train_adapter)"},
    # gain: the choice the arm flips; undo: the arm undoes a choice lora_search makes (gain = ours / arm),
    # else it tries one lora_search does not make here (gain = arm / ours, what enabling it would bring)
    "padding_free": {"runner": "ours", "overrides": ["trainer.padding_free=true"],
                     "what": "lora_search with padding-free batches forced on", "gain": "padding-free batches",
                     "undo": False},
    "padded": {"runner": "ours", "overrides": ["trainer.padding_free=false"],
               "what": "lora_search with padded batches", "gain": "padding-free batches", "undo": True},
    "full_lm_head": {"runner": "ours", "overrides": ["trainer.compact_lm_head=false"],
                     "what": "lora_search with the LM head over every position (TRL's choice on CPU)",
                     "gain": "LM head over completion positions only", "undo": True},
    "fp32": {"runner": "ours", "overrides": ["trainer.precision=fp32"],
             "what": "lora_search in fp32", "gain": "bf16 autocast", "undo": True},
    "threads1": {"runner": "ours", "overrides": ["trainer.num_threads=1"],
                 "what": "lora_search on one torch thread", "gain": f"{os.cpu_count()} torch threads (one per core)",
                 "undo": True},
    "trl_nf4": {"runner": "trl", "overrides": ["quant=nf4"], "what": "plain TRL script, nf4 base (QLoRA)"},
    "lora_search_nf4": {"runner": "ours", "overrides": ["quant=nf4"], "what": "a lora_search trial, nf4 base"},
}
CPU_ARMS = ("trl", "lora_search", "full_lm_head", "padding_free", "fp32", "threads1")
GPU_ARMS = ("trl", "lora_search", "trl_nf4", "lora_search_nf4", "padding_free")
PAIRS = (("lora_search", "trl"), ("lora_search_nf4", "trl_nf4"))  # (ours, peer) compared against the target

# Models: overrides that select them (and the sweep's trial budget applied on top).
LLAMA_1B = ("{hidden_size: 2048, intermediate_size: 5632, num_hidden_layers: 22, num_attention_heads: 32, "
            "num_key_value_heads: 4, max_position_embeddings: 2048, tie_word_embeddings: false, seed: 0}")
MODELS = {
    "embedded": [],
    "llama1b": ["model=tiny_llama", "model.name=llama_1b_random", f"model.tiny={LLAMA_1B}", "model.dtype=bfloat16",
                "trainer.batch_size=16", "trainer.eval_batch_size=32"],
    "tiny": ["model=tiny_llama", "data.train_per_task=8", "data.eval_per_task=4", "trainer.batch_size=4",
             "trainer.eval_batch_size=8", "trainer.precision=fp32"],
}

# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, for MFU; an unknown GPU gets no MFU.
PEAK_BF16 = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.0e12,
             "H100 NVL": 835.0e12, "H100": 989.4e12, "A100": 312.0e12, "L40S": 362.0e12, "L4": 121.0e12,
             "A10G": 70.0e12, "A10": 125.0e12, "RTX 4090": 165.2e12}


# ---- figures ----

def peak_flops(gpu_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU named like torch.cuda.get_device_name() (longest matching key wins)."""
    if not gpu_name:
        return None
    matches = [k for k in PEAK_BF16 if k.lower() in gpu_name.lower()]
    return PEAK_BF16[max(matches, key=len)] if matches else None


def lora_flops_per_token(base_matmul_params: int, lora_params: int) -> int:
    """Model FLOPs per trained token for LoRA: the frozen base runs forward (2N) and backward for activation
    gradients only (2N, no weight gradients); the adapters run forward and both backward passes (6n).
    Attention score FLOPs are left out (small at these sequence lengths), as are embedding lookups."""
    return 4 * base_matmul_params + 6 * lora_params


def matmul_params(model) -> int:
    """Parameters of the base that take part in matmuls: everything but the input embeddings (and LoRA)."""
    import torch

    emb = model.get_input_embeddings()
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    out = model.get_output_embeddings()
    tied = out is not None and emb is not None and out.weight is emb.weight
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name or (id(p) in skip and not tied):
            continue
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or p.dtype == torch.uint8:
            n *= 2  # a 4-bit weight is stored two values per byte
        total += n
    return total


class StepClock:
    """Per optimizer step: seconds and the tokens trained on (state.num_input_tokens_seen)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.steps, self._t0, self._tokens = [], None, 0

            def on_step_begin(self, args, state, control, **kwargs):
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if self._t0 is None:
                    return
                _cuda_sync()  # kernels are asynchronous: the step is done when the GPU is
                seen = int(state.num_input_tokens_seen)
                self.steps.append((time.perf_counter() - self._t0, seen - self._tokens))
                self._tokens, self._t0 = seen, None

        return _Clock()


def step_figures(steps: list[tuple[float, int]], skip: int) -> dict:
    """tokens/s over every step and over the steps after the first `skip` (steady state)."""
    def rate(rows):
        seconds, tokens = sum(s for s, _ in rows), sum(t for _, t in rows)
        return (tokens / seconds if seconds else None), seconds, tokens

    all_rate, all_s, all_tokens = rate(steps)
    steady = steps[skip:] if len(steps) > skip else steps
    steady_rate, steady_s, steady_tokens = rate(steady)
    return {"steps": len(steps), "tokens": all_tokens, "step_s": all_s, "tokens_per_s_all": all_rate,
            "tokens_per_s": steady_rate, "steady_steps": len(steady), "steady_tokens": steady_tokens,
            "steady_step_s": steady_s, "step_s_each": [round(s, 4) for s, _ in steps],
            "tokens_each": [t for _, t in steps]}


# ---- one arm, in a child process ----

def arm_config(spec: dict, arm: str, work: Path):
    """The run config an arm trains: the sweep's trial budget, the fixed params, the arm's own overrides."""
    from lora_search.config.compose import load_config

    cfg = load_config(["sweep=rank_lr", f"results_dir={work}", "tracking=none", *spec["overrides"],
                       *ARMS[arm]["overrides"]])
    budget = {"trainer.max_steps": spec["steps"], "trainer.eval_every": spec["eval_every"]}
    if spec.get("eval_subset"):
        budget["trainer.eval_subset"] = spec["eval_subset"]
    return common.trial_config(common.trial_base(cfg), {**PARAMS, **budget})


def _cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _precision(cfg, dtype) -> str:
    """lora_search's precision for a config, worded as precision_label words a TrainingArguments'."""
    from types import SimpleNamespace

    from lora_search.core import hardware

    mode = hardware.precision(cfg.trainer.precision)
    return common.precision_label(SimpleNamespace(bf16=mode == "bf16", fp16=mode == "fp16"), dtype)


def run_ours(cfg, work: Path, skip: int) -> dict:
    """A lora_search trial, twice on one Worker (the second timed)."""
    from lora_search.commands import train_stage
    from lora_search.train import run

    worker = train_stage.start_worker(cfg)
    rows = []
    for attempt in range(2):
        clock = StepClock()
        m = run.train_adapter(worker, cfg, work / f"ours-{attempt}", callbacks=[clock], with_baseline=False,
                                save=False)
        rows.append((m, clock))
    m, clock = rows[-1]
    evals = m.get("periodic_eval_s") or 0.0
    n_evals = cfg.trainer.max_steps // cfg.trainer.eval_every if cfg.trainer.eval_every else 0
    return {**step_figures(clock.steps, skip), "peak_memory_mb": m["peak_memory_mb"], "eval_s": evals,
            "evals": n_evals, "eval_rows": min(cfg.trainer.eval_subset, len(worker.data.eval)),
            "eval_loss": m["eval_loss"], "train_loss_first": m["train_loss_first"],
            "train_loss_last": m["train_loss_last"], "padding_free": m.get("padding_free"),
            "compact_lm_head": m.get("compact_lm_head"),
            "trainable_params": m["trainable_params"], "matmul_params": matmul_params(worker.base.model),
            "precision": _precision(cfg, worker.base.model.dtype), "torch_threads": common.torch_threads(),
            "model_dtype": str(worker.base.model.dtype).replace("torch.", ""), "quant": cfg.quant.mode}


def load_plain(cfg, folder: str):
    """The model as a plain script loads it: from_pretrained (bf16 on a GPU, as the guides write it), and for
    QLoRA a BitsAndBytesConfig plus peft's prepare_model_for_kbit_training (checkpointing as the config says)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if torch.cuda.is_available():
        kwargs.update(dtype=torch.bfloat16, device_map={"": 0})
    if cfg.quant.mode == "nf4":
        from peft import prepare_model_for_kbit_training

        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.trainer.gradient_checkpointing)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def run_trl(cfg, work: Path, skip: int) -> dict:
    """The plain TRL script, twice (a fresh model and adapter each time; the second timed)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, set_seed
    from trl import SFTTrainer

    from lora_search.core import hardware
    from lora_search.data.load import load_task_data
    from lora_search.models import loaders
    from lora_search.train.evaluate import timed_evaluate

    folder = loaders.local_copy(cfg.model, cfg.cache_dir)
    data = load_task_data(cfg.data)
    out = {}
    for attempt in range(2):
        set_seed(cfg.trainer.seed)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = get_peft_model(load_plain(cfg, folder), common.lora_config(cfg))
        args = common.peer_sft_args(cfg, work / f"trl-{attempt}", "trl")
        args.include_num_input_tokens_seen = "non_padding"  # measured only: training is unchanged
        clock = StepClock()
        trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                             processing_class=tokenizer, callbacks=[clock])
        evals = timed_evaluate(trainer)
        with hardware.PeakMemory() as peak:
            trainer.train()
            _cuda_sync()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        out = {**step_figures(clock.steps, skip), "peak_memory_mb": round(peak.peak_mb, 1),
               "eval_s": evals["seconds"], "evals": evals["count"], "eval_rows": len(data.eval),
               "eval_loss": (evals["last"] or (0, 0, {}))[2].get("eval_loss"),
               "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
               "padding_free": bool(args.padding_free), "compact_lm_head": torch.cuda.is_available(),
               "trainable_params": model.get_nb_trainable_parameters()[0],
               "matmul_params": matmul_params(model.get_base_model()),
               "precision": common.precision_label(args, model.get_base_model().dtype),
               "torch_threads": common.torch_threads(),
               "model_dtype": str(model.get_base_model().dtype).replace("torch.", ""), "quant": cfg.quant.mode}
        trainer.accelerator.free_memory()
        del trainer, model
        gc.collect()
    return out


def child(arm: str, spec: dict) -> dict:
    """Run one arm in this process and return its figures."""
    with tempfile.TemporaryDirectory(prefix=f"throughput-{arm}-") as tmp:
        work = Path(tmp)
        cfg = arm_config(spec, arm, work)
        runner = run_trl if ARMS[arm]["runner"] == "trl" else run_ours
        t0 = time.perf_counter()
        row = runner(cfg, work, spec["skip_steps"])
        row["wall_s"] = time.perf_counter() - t0
    row["mfu"] = mfu(row)
    return row


def mfu(row: dict) -> float | None:
    """LoRA-adjusted model FLOPs utilisation of a run on a GPU (None on a CPU or an unknown GPU)."""
    import torch

    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    if not (peak and row.get("tokens_per_s") and row.get("matmul_params")):
        return None
    return row["tokens_per_s"] * lora_flops_per_token(row["matmul_params"], row["trainable_params"]) / peak


# ---- the parent: arms side by side ----

def spawn(arm: str, spec: dict, folder: Path, repeat: int) -> dict:
    """One arm in a fresh Python process; its figures, or its error and the tail of its output."""
    out = folder / f"{arm}-{repeat}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--spec", json.dumps(spec),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{arm} exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return json.loads(out.read_text())


def _median_row(runs: list[dict]) -> dict:
    """An arm over its repeats: the run with the median tokens/s (the upper one of an even count), with every
    run's tokens/s and memory."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[0].get("error")}
    row = dict(sorted(good, key=lambda r: r.get("tokens_per_s") or 0)[len(good) // 2])  # the median run
    row["tokens_per_s_runs"] = [common.rounded(r.get("tokens_per_s"), 2) for r in good]
    row["peak_memory_mb_runs"] = [r.get("peak_memory_mb") for r in good]
    if len(runs) > len(good):
        row["errors"] = [r["error"] for r in runs if "error" in r]
    return row


def summarize(arms: dict[str, dict], gpu: bool) -> dict:
    """Ratios against plain TRL and each choice's gain (lora_search over the arm that undoes it)."""
    def tps(name):
        return (arms.get(name) or {}).get("tokens_per_s")

    target = TARGET_GPU if gpu else TARGET_CPU
    ratios = {}
    for ours, peer in PAIRS:
        if tps(ours) and tps(peer):
            a, b = arms[ours], arms[peer]
            ratios[f"{ours}_vs_{peer}"] = {
                "tokens_per_s": common.rounded(tps(ours) / tps(peer)),
                "peak_memory": common.rounded(a["peak_memory_mb"] / b["peak_memory_mb"])
                if a.get("peak_memory_mb") and b.get("peak_memory_mb") else None,
                "eval_s_per_trial": [common.rounded(a.get("eval_s")), common.rounded(b.get("eval_s"))],
                "target": target, "met": tps(ours) / tps(peer) >= target}
    gains = {}
    for name, arm in ARMS.items():
        if arm.get("gain") and tps(name) and tps("lora_search"):
            with_it, without = (tps("lora_search"), tps(name)) if arm["undo"] else (tps(name), tps("lora_search"))
            gains[arm["gain"]] = {"arm": name, "taken": arm["undo"], "speedup": common.rounded(with_it / without),
                                  "tokens_per_s_with_without": [common.rounded(with_it, 2), common.rounded(without, 2)]}
    ours, peer = arms.get("lora_search") or {}, arms.get("trl") or {}
    if ours.get("eval_s") and peer.get("eval_s"):
        gains["cheaper evals"] = {
            "what": f"per trial: {ours.get('evals')} evals of {ours.get('eval_rows')} rows (lora_search) against "
                    f"{peer.get('evals')} of {peer.get('eval_rows')} (plain TRL)",
            "speedup": common.rounded(peer["eval_s"] / ours["eval_s"]),
            "eval_s": [common.rounded(ours["eval_s"]), common.rounded(peer["eval_s"])]}
    return {"ratios": ratios, "gains": gains}


def run(model: str | None = None, arms: list[str] | None = None, repeats: int = 2, steps: int | None = None,
        skip_steps: int = 2, batch_size: int | None = None, quick: bool = False,
        out: Path | str | None = None, cache_dir: str | None = None) -> dict:
    """Every arm side by side (alternating order), then write results/bench/throughput.json."""
    import torch

    gpu = torch.cuda.is_available()
    model = model or ("tiny" if quick else "llama1b" if gpu else "embedded")
    arms = list(arms or (GPU_ARMS if gpu else CPU_ARMS))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)}; known: {', '.join(ARMS)}")
    if model not in MODELS:
        raise SystemExit(f"--model must be one of {', '.join(MODELS)}; got {model!r}")
    overrides = list(MODELS[model]) + ([f"trainer.batch_size={batch_size}"] if batch_size else []) + \
        ([f"cache_dir={cache_dir}"] if cache_dir else [])
    steps = steps or (4 if quick else 10)
    spec = {"overrides": overrides, "steps": steps, "eval_every": max(1, steps // 2), "skip_steps": skip_steps,
            "eval_subset": 8 if quick else None}  # quick: tiny eval set of 16 rows, subset smaller still
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        runners = {arm: (lambda spec_, r, arm=arm: spawn(arm, spec_, Path(tmp), r)) for arm in arms}
        with common.Stopwatch() as total:
            per_arm, order = common.alternate(runners, repeats, spec, combine=_median_row)
    for arm in arms:
        per_arm[arm]["what"] = ARMS[arm]["what"]
    cfg = arm_config(spec, "lora_search", Path(tempfile.gettempdir()))
    result = common.record(NAME, {
        "model": cfg.model.name, "quick": quick, "gpu": gpu, "order": order, "wall_s": total.seconds,
        "settings": {"model": model, "params": PARAMS, "steps": steps, "eval_every": spec["eval_every"],
                     "skip_steps": skip_steps, "batch_size": cfg.trainer.batch_size, "repeats": repeats,
                     "max_length": cfg.trainer.max_length, "overrides": overrides,
                     "tokens": "non-padding tokens trained on, per optimizer step",
                     "mfu": "tokens/s x (4 x base matmul params + 6 x LoRA params) / dense bf16 peak" if gpu else None},
        **summarize(per_arm, gpu),
        "arms": per_arm,
    })
    common.write_record(result, out or (common.ROOT / "results" / "bench-quick" / f"{NAME}.json" if quick else None))
    return result


def main(argv: list[str] | None = None) -> dict:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), help="embedded on CPU, llama1b on CUDA; tiny with --quick")
    p.add_argument("--arms", nargs="+", help=f"arms to run (known: {', '.join(ARMS)})")
    p.add_argument("--repeats", type=int, default=None, help="runs of every arm, alternating order (2; 1 --quick)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per trial (10; 4 with --quick)")
    p.add_argument("--skip-steps", type=int, default=2, help="first steps of the timed run left out of tokens/s")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch size (the config's by default)")
    p.add_argument("--quick", action="store_true", help="tiny model and budget (for the tests)")
    p.add_argument("--out", help="where to write the record")
    p.add_argument("--cache-dir", help="where converted models live (default ~/.cache/lora_search)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    common.configure_logging()
    if a.child:
        row = child(a.child, json.loads(a.spec))
        Path(a.out).write_text(json.dumps(row, default=str))
        return row
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 2)
    if repeats < 1:
        p.error(f"--repeats must be at least 1, got {repeats}")
    result = run(a.model, a.arms, repeats, a.steps, a.skip_steps, a.batch_size, a.quick, a.out, a.cache_dir)
    for key, r in result["ratios"].items():
        print(f"{key}: tokens/s x{common.fmt(r['tokens_per_s'], '.2f')} (target >= {r['target']}: "
              f"{'met' if r['met'] else 'not met'}), peak memory x{common.fmt(r['peak_memory'], '.2f')}")
    for gain, g in result["gains"].items():
        taken = "" if g.get("taken", True) else " (not taken by default here)"
        print(f"  {gain}: x{common.fmt(g['speedup'], '.2f')}{taken}")
    return result


if __name__ == "__main__":
    main()
