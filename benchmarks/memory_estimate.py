"""Peak memory: lora_search.models.memory's configuration-based estimate against the peak a run records.

Every configuration (ranks, targets, batch sizes, max_length, quant modes, gradient checkpointing, DPO) trains a few
steps in a FRESH Python process, as a sweep trial runs it (train_stage.start_worker, then run.train_adapter with no
baseline and no save), and reports the `peak_memory_mb` it records: on CPU the process's sampled peak RSS over
training and the final eval, on CUDA torch.cuda.max_memory_allocated(). The parent then estimates each
configuration with memory.estimate (no weights loaded) and records the relative error.

The estimate is given the data's row lengths as the sweep knows them once its data is tokenized (the longest row,
the mean completion tokens per row); the upper bound it falls back to without them (every row max_length tokens,
every token a completion token) is recorded too, as `upper_bound_mb`.

  .venv/bin/python benchmarks/memory_estimate.py            # embedded SmolLM2, 20 configurations (~10 min, 2 cores)
  .venv/bin/python benchmarks/memory_estimate.py --quick    # tiny model, 3 configurations (seconds)
  .venv/bin/python benchmarks/memory_estimate.py --reuse results/bench/memory_estimate.json   # re-estimate only

Goal: within 20% of the measured peak on CPU for every configuration (10% on CUDA).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

NAME = "memory_estimate"
GOAL = {"cpu": 0.20, "cuda": 0.10}
# What every configuration shares: a few steps, no periodic eval, a 16-row final eval, no generation.
# What every configuration shares: a sweep trial's length (sweeps/rank_lr.yaml: 10 steps), no periodic eval, a
# 16-row final eval, no generation.
COMMON = ["tracking=none", "trainer.max_steps=10", "trainer.eval_every=0", "trainer.final_eval=subset",
          "trainer.eval_subset=16", "trainer.exact_match_items=0", "trainer.logging_steps=1"]
CONFIGS = {  # label -> overrides (model=smollm2_135m, the default: lora=balanced, r8 on attn, batch 8, max_length 256)
    "default_r8_attn": [],
    "r4_qv": ["lora.r=4", "lora.targets=qv"],
    "r16_mlp": ["lora.r=16", "lora.targets=mlp"],
    "r32_all_linear": ["lora.r=32", "lora.targets=all_linear"],
    "r64_all_linear": ["lora.r=64", "lora.targets=all_linear"],
    "batch2": ["trainer.batch_size=2"],
    "batch16": ["trainer.batch_size=16"],
    "len44": ["trainer.max_length=44"],  # the embedded rows are 30-67 tokens: shorter max_length truncates
    "steps3": ["trainer.max_steps=3"],
    "steps40": ["trainer.max_steps=40"],
    "gc": ["trainer.gradient_checkpointing=true"],
    "fp32": ["trainer.precision=fp32"],
    "full_lm_head": ["trainer.compact_lm_head=false"],
    "eager": ["model.attn_implementation=eager"],
    "int8": ["quant=int8"],
    "int8_all_linear_gc": ["quant=int8", "lora.targets=all_linear", "trainer.gradient_checkpointing=true"],
    "nf4": ["quant=nf4"],
    "nf4_gc": ["quant=nf4", "trainer.gradient_checkpointing=true"],
    "dora_r16": ["lora.r=16", "lora.use_dora=true"],
    "dpo": ["trainer=dpo", "data=embedded_preference"],
}
QUICK = {  # the tiny model: seconds
    "tiny_default": ["model=tiny_llama", "data.train_per_task=24", "data.eval_per_task=6"],
    "tiny_gc": ["model=tiny_llama", "data.train_per_task=24", "data.eval_per_task=6",
                "trainer.gradient_checkpointing=true"],
    "tiny_nf4": ["model=tiny_llama", "data.train_per_task=24", "data.eval_per_task=6", "quant=nf4"],
}
log = logging.getLogger("bench")


# ---- one configuration, in a child process ----

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(overrides: list[str], cache_dir: str | None) -> dict:
    """Train one configuration in this (fresh) process as a sweep trial does; its recorded peak and row lengths."""
    rss_start = _rss_mb()
    from lora_search.commands import train_stage
    from lora_search.config.compose import load_config
    from lora_search.core import hardware
    from lora_search.search.memory_budget import row_lengths
    from lora_search.train import dpo, run
    from lora_search.train.sft import padding_free

    with tempfile.TemporaryDirectory(prefix="memory-estimate-") as tmp:
        cache = [f"cache_dir={cache_dir}"] if cache_dir else []
        cfg = load_config([f"results_dir={tmp}", *COMMON, *overrides, *cache])
        data, _ = train_stage.preflight(cfg)
        rss_before_load = _rss_mb()
        worker = train_stage.start_worker(cfg, data)
        m = run.train_adapter(worker, cfg, Path(tmp) / "run", with_baseline=False, save=False)
        key = dpo.data_key(cfg) if cfg.trainer.method == "dpo" else \
            run.data_key(cfg, padding_free(cfg, worker.base.model))
        rows = worker.tokenized[key][0]
        lengths = row_lengths(rows, cfg.trainer.method)  # what a sweep's estimates use (feasible.worker_lengths)
    return {"peak_memory_mb": m["peak_memory_mb"], "rss_start_mb": round(rss_start, 1),
            "rss_before_load_mb": round(rss_before_load, 1), "trainable_params": m["trainable_params"],
            "steps": m["steps"], "train_tokens": m["train_tokens"],
            "precision": hardware.precision(cfg.trainer.precision), **lengths}


def spawn(overrides: list[str], cache_dir: str | None, folder: Path, label: str) -> dict:
    """One configuration in a fresh process (its RSS is its own): its figures, or RuntimeError with its output."""
    out = folder / f"{label}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(overrides), "--out", str(out),
           *(["--cache-dir", cache_dir] if cache_dir else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{label} exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    return {**json.loads(out.read_text()), "wall_s": round(time.perf_counter() - t0, 1)}


# ---- the parent: measure, estimate, compare ----

def estimate_row(label: str, overrides: list[str], measured: dict, device: str, cache_dir: str | None) -> dict:
    """A measured configuration against memory.estimate (with the data's row lengths, and the upper bound)."""
    from lora_search.config.compose import load_config
    from lora_search.models import loaders, memory

    cfg = load_config([*COMMON, *overrides, *([f"cache_dir={cache_dir}"] if cache_dir else [])])
    arch = loaders.architecture(cfg.model, cfg.cache_dir)
    est = memory.estimate(cfg, arch, device, seq_len=measured["seq_len"], completion_len=measured["completion_len"])
    bound = memory.estimate(cfg, arch, device)
    peak = measured["peak_memory_mb"]
    err = (est.total_mb - peak) / peak
    return {"label": label, "overrides": overrides, "measured_mb": peak, "estimate_mb": round(est.total_mb, 1),
            "rel_error": round(err, 4), "parts": {k: round(v, 1) for k, v in est.parts.items()},
            "upper_bound_mb": round(bound.total_mb, 1), "base_mb": round(memory.base_mb(cfg, arch, device), 1),
            "measured": measured}


def summarize(rows: list[dict], goal: float) -> dict:
    """Median and max absolute relative error, and how many configurations are within the goal."""
    errs = [abs(r["rel_error"]) for r in rows if "rel_error" in r]
    return {"configs": len(rows), "measured": len(errs), "median_abs_rel_error": common.rounded(common.median(errs), 4),
            "max_abs_rel_error": round(max(errs), 4) if errs else None,
            "within_goal": sum(e <= goal for e in errs), "goal": goal, "met": bool(errs) and max(errs) <= goal,
            "upper_bound_never_below": all(r["upper_bound_mb"] >= r["measured_mb"] for r in rows if "rel_error" in r)}


def run(quick: bool = False, out: Path | str | None = None, cache_dir: str | None = None,
        reuse: str | None = None, only: list[str] | None = None) -> dict:
    """Measure every configuration (each in a fresh process, one at a time), estimate, write the record."""
    import torch

    configs = dict(QUICK if quick else CONFIGS)
    if only:
        configs = {k: v for k, v in configs.items() if k in only}
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    previous = {}
    if reuse:  # re-estimate against measurements already taken (a formula change needs no new runs)
        old = json.loads(Path(reuse).read_text())
        previous = {r["label"]: r["measured"] for r in old.get(device, {}).get("rows", []) if "measured" in r}
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-estimate-") as tmp, common.Stopwatch() as total:
        for i, (label, overrides) in enumerate(configs.items()):
            row = {"label": label, "overrides": overrides}
            try:  # one configuration failing must not lose the others (nor a failed estimate its measurement)
                row["measured"] = previous.get(label) or spawn(overrides, cache_dir, Path(tmp), label)
                row = estimate_row(label, overrides, row["measured"], device, cache_dir)
                log.info("%2d/%d %-24s measured %7.1f MB, estimate %7.1f MB (%+.1f%%), %s s", i + 1, len(configs),
                         label, row["measured_mb"], row["estimate_mb"], 100 * row["rel_error"],
                         row["measured"].get("wall_s"))
            except Exception as e:
                log.exception("%s failed", label)
                row["error"] = f"{type(e).__name__}: {e}"[-2000:]
            rows.append(row)
    result = common.record(NAME, {
        "quick": quick, "wall_s": round(total.seconds, 1), "reused_measurements": bool(reuse),
        # the children's own wall time: what measuring took (the same when the measurements are reused)
        "measure_s": round(sum(r["measured"].get("wall_s") or 0 for r in rows if "measured" in r), 1),
        "settings": {"common": COMMON, "model": "tiny_llama" if quick else "smollm2_135m",
                     "measured": "peak_memory_mb as train_adapter records it (CPU: sampled peak RSS of a fresh "
                                 "process over training and the final eval; CUDA: max allocated)",
                     "estimate": "memory.estimate(cfg, arch, device, seq_len=longest tokenized row, "
                                 "completion_len=mean completion tokens per row)"},
        device: {"summary": summarize(rows, GOAL[device]), "rows": rows},
        **({} if gpu else {"cuda": {"skipped": "no GPU available on this machine (torch.cuda.is_available() is "
                                               "False): the CUDA goal (10%) was not measured"}}),
    })
    common.write_record(result, out or (common.ROOT / "results" / "bench-quick" / f"{NAME}.json" if quick else None))
    return result


def main(argv: list[str] | None = None) -> dict:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 3 configurations (for the tests)")
    p.add_argument("--only", nargs="+", help=f"configurations to run (known: {', '.join(CONFIGS)})")
    p.add_argument("--reuse", help="a record whose measurements to re-estimate (no training)")
    p.add_argument("--out", help="where to write the record")
    p.add_argument("--cache-dir", help="where converted models live (default ~/.cache/lora_search)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    common.configure_logging()
    if a.child:
        row = child(json.loads(a.child), a.cache_dir)
        Path(a.out).write_text(json.dumps(row))
        return row
    result = run(a.quick, a.out, a.cache_dir, a.reuse, a.only)
    device = "cpu" if "cpu" in result else "cuda"
    s = result[device]["summary"]
    print(f"{device}: {s['measured']} of {s['configs']} configurations measured; median |error| "
          f"{common.fmt(s['median_abs_rel_error'], '.1%')}, max {common.fmt(s['max_abs_rel_error'], '.1%')}, "
          f"{s['within_goal']} within {s['goal']:.0%} ({'met' if s['met'] else 'not met'}); {result['wall_s']} s")
    return result


if __name__ == "__main__":
    main()
