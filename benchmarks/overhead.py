"""What a lora_search trial spends outside training, and whether a worker leaks across trials.

Runs the rank_lr search (W&B offline on, as users run it; no pruner, so every trial is whole) for
20 trials in this process and records, per trial:
  - time from the trial's start (Optuna's datetime_start, before sampling) to its first optimizer step;
  - the share of the trial's wall time spent outside optimizer steps and the periodic evals the pruner
    reads (set-up, final eval, records, W&B, clean-up): target at most 10%;
  - the memory the worker holds after the trial (every live tensor's storage on CPU, allocated CUDA
    memory on a GPU; the RSS beside it) and the live PeftModel, LoRA layer and optimizer objects:
    growth after 20 trials at most 1% over the first.

  .venv/bin/python benchmarks/overhead.py            # embedded SmolLM2, 20 trials -> results/bench/overhead.json
  .venv/bin/python benchmarks/overhead.py --quick    # tiny model, 3 trials (seconds; the tests use it)
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402
from lora_search.commands import pipeline
from lora_search.config.compose import load_config  # noqa: E402
from lora_search.core import records
from lora_search.search import study as study_lib  # noqa: E402

NAME = "overhead"
QUICK = ["model=tiny_llama", "data.train_per_task=8", "data.eval_per_task=4", "trainer.batch_size=4",
         "trainer.precision=fp32", "++sweep.trial={trainer.max_steps: 4, trainer.eval_every: 2, "
         "trainer.eval_subset: 8, trainer.exact_match_items: 0, trainer.final_eval: subset}"]
TARGET_SHARE, TARGET_GROWTH = 0.10, 0.01


def rss_mb() -> float:
    """The process RSS (it includes what the allocator keeps cached: noisy on CPU)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def memory_mb(model=None) -> float:
    """Memory the worker holds in tensors (hardware.tensor_memory_mb: allocated CUDA memory, else every live CPU
    tensor's storage, the frozen base counted from the model)."""
    from lora_search.core import hardware

    return hardware.tensor_memory_mb(model)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def live_objects() -> dict:
    """Live PeftModels, LoRA layers and optimizers (each should be 0 between trials)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    gc.collect()
    counts = {"peft_models": 0, "lora_layers": 0, "optimizers": 0}
    for obj in gc.get_objects():
        if isinstance(obj, PeftModel):
            counts["peft_models"] += 1
        elif isinstance(obj, LoraLayer):
            counts["lora_layers"] += 1
        elif isinstance(obj, torch.optim.Optimizer):
            counts["optimizers"] += 1
    return counts


class Probe:
    """Wraps the objective's train_adapter: first-step time; memory and leak checks once training returned."""

    def __init__(self, train_adapter):
        self.train_adapter, self.entries, self.first_steps, self.probe_s = train_adapter, [], [], []
        self.prepared = None  # whether the worker held tokenized data when the first trial began
        # entries[i]: after trial i's training returned (its adapter detached); probe_s[i]: time spent measuring

    def __call__(self, worker, cfg, out_dir, callbacks=(), **kwargs):
        from transformers import TrainerCallback

        probe = self
        if self.prepared is None:
            self.prepared = bool(worker.tokenized)

        class FirstStep(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == 0:
                    probe.first_steps.append(time.time())

        try:
            return self.train_adapter(worker, cfg, out_dir, callbacks=[*callbacks, FirstStep()], **kwargs)
        finally:  # the adapter and optimizer are gone by now: what is left is what the worker holds
            t0 = time.perf_counter()
            self.entries.append({"memory_mb": memory_mb(worker.base.model), "rss_mb": rss_mb(), **live_objects()})
            self.probe_s.append(time.perf_counter() - t0)


def run(trials: int = 20, quick: bool = False, out: Path | str | None = None) -> dict:
    """Run the search with the probe in place and write results/bench/overhead.json."""
    with tempfile.TemporaryDirectory(prefix="overhead-") as work:
        cfg = load_config(["sweep=rank_lr", "stage=search", f"sweep.n_trials={trials}", "sweep.pruner=none",
                           f"results_dir={work}", *(QUICK if quick else [])])
        probe = Probe(study_lib.train_adapter)
        study_lib.train_adapter = probe
        try:
            with common.Stopwatch() as total:
                pipeline.run(cfg)
        finally:
            study_lib.train_adapter = probe.train_adapter
        study = study_lib.open_study(cfg)
        rows = [_trial_row(t, study_lib.study_dir(cfg), probe, i) for i, t in enumerate(study.trials)]
    held = [e["memory_mb"] for e in probe.entries]  # after trial 1, 2, ..., n
    growth = (held[-1] - held[0]) / held[0] if held and held[0] else None
    shares = [r["outside_share"] for r in rows if r["outside_share"] is not None]
    firsts = [r["to_first_step_s"] for r in rows if r["to_first_step_s"] is not None]
    result = common.record(NAME, {
        "model": cfg.model.name, "trials": trials, "quick": quick, "tokenized_before_first_trial": probe.prepared,
        "tracking": f"{cfg.tracking.backend} "
        f"({cfg.tracking.mode})", "max_steps": rows[0]["steps"] if rows else None, "wall_s": total.seconds,
        "to_first_step_s": {"first_trial": firsts[0] if firsts else None,
                            "median_later": common.median(firsts[1:]), "max_later": max(firsts[1:], default=None)},
        "outside_share": {"median": common.median(shares), "max": max(shares, default=None)},
        "memory_mb_after_trial": [round(m, 1) for m in held], "memory_growth": growth,
        "memory_measure": "CUDA memory_allocated" if _cuda() else
        "bytes of every live tensor storage (process RSS, which includes the allocator's cache, in rss_mb)",
        "live_objects_between_trials": probe.entries,
        "targets": {"outside_share": TARGET_SHARE, "outside_share_met": bool(shares) and max(shares) <= TARGET_SHARE,
                    "memory_growth": TARGET_GROWTH, "memory_growth_met": growth is not None and growth <= TARGET_GROWTH},
        "per_trial": rows,
    })
    common.write_record(result, out or (common.ROOT / "results" / "bench-quick" / f"{NAME}.json" if quick else None))
    return result


def _trial_row(trial, out: Path, probe: Probe, i: int) -> dict:
    metrics = records.read_json(out / "trials" / f"{trial.number:04d}" / "metrics.json") or {}
    wall = trial.duration.total_seconds() - probe.probe_s[i] if trial.duration else None
    inside = (metrics.get("train_step_s") or 0) + (metrics.get("periodic_eval_s") or 0)
    first = probe.first_steps[i] - trial.datetime_start.timestamp() if i < len(probe.first_steps) \
        else None
    return {"number": trial.number, "state": trial.state.name.lower(), "steps": metrics.get("steps"),
            "wall_s": common.rounded(wall), "train_step_s": common.rounded(metrics.get("train_step_s")),
            "periodic_eval_s": common.rounded(metrics.get("periodic_eval_s")),
            "to_first_step_s": common.rounded(first),
            "outside_share": common.rounded((wall - inside) / wall, 4) if wall and metrics.get("train_step_s") else None}


def main(argv: list[str] | None = None) -> dict:
    """Command line: --trials, --quick, --out."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=None, help="trials to run (20; 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model and budget (for the tests)")
    p.add_argument("--out", help="where to write the record")
    a = p.parse_args(argv)
    common.configure_logging()
    result = run(a.trials or (3 if a.quick else 20), a.quick, a.out)
    share, first = result["outside_share"], result["to_first_step_s"]
    print(f"outside optimizer steps and pruning evals: median {common.fmt(share['median'], '.1%')}, max "
          f"{common.fmt(share['max'], '.1%')} (target <= {TARGET_SHARE:.0%}); first step after "
          f"{common.fmt(first['median_later'], '.2f')} s (first trial {common.fmt(first['first_trial'], '.2f')} s); "
          f"memory growth {common.fmt(result['memory_growth'], '.2%')} (target <= {TARGET_GROWTH:.0%})")
    return result


if __name__ == "__main__":
    main()
