"""What the benchmark scripts share: the machine record, atomic writes to results/bench/<name>.json,
timing, and the sweep (space, sampler, per-trial budget and training settings) the peers reproduce.

The peers get the search space, sampler and trial budget from the same composed config lora_search
runs (`sweeps/rank_lr.yaml`), so every approach samples the same keys, in the same order, from the
same seeded TPE sampler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_search.config.schema import RunConfig

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# lora_search (and so torch) is imported where it is used: readme_section.py needs none of it.

BENCH_DIR = ROOT / "results" / "bench"
PEER_PRECISIONS = ("trl", "fp32")  # TRL's SFTConfig defaults (bf16 mixed) | bf16 and fp16 off


# ---- records ----

def bench_path(name: str) -> Path:
    """results/bench/<name>.json."""
    return BENCH_DIR / f"{name}.json"


def record(name: str, figures: dict) -> dict:
    """A benchmark record: its name, its figures and the machine it ran on (CPU, cores, GPU, package versions)."""
    from lora_search.core import hardware

    return {"name": name, **figures, "provenance": hardware.provenance()}


def write_record(data: dict, out: Path | str | None = None) -> Path:
    """Write a record atomically (temp file + rename) to `out`, default results/bench/<name>.json."""
    from lora_search.core import records

    path = Path(out) if out else bench_path(data["name"])
    records.write_json(path, data)
    return path


def read_records(folder: Path | str = BENCH_DIR) -> tuple[list[dict], list[str]]:
    """Every results/bench/*.json record (sorted by file name), and one line per file that could not be read."""
    found, problems = [], []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{path.name}: unreadable ({type(e).__name__})")
            continue
        if not isinstance(data, dict):
            problems.append(f"{path.name}: not a record (a JSON object)")
            continue
        data.setdefault("name", path.stem)
        resolved = path.resolve()
        data["_file"] = str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)
        found.append(data)
    return found, problems


def machine_line(provenance: dict | None) -> str:
    """One line naming the machine and the versions that matter: CPU, cores, GPU, torch, transformers, ..."""
    if not provenance:
        return "machine not recorded"
    m = provenance.get("machine") or {}
    pkgs = provenance.get("packages") or {}
    parts = [f"{m.get('cpu', 'unknown CPU')}, {m.get('cores', '?')} cores"]
    if m.get("memory_gb"):
        parts.append(f"{m['memory_gb']} GB")
    parts.append(f"GPU {m['gpu']}" if m.get("gpu") else "no GPU")
    versions = ", ".join(f"{k} {pkgs[k]}" for k in ("torch", "transformers", "peft", "trl", "optuna") if pkgs.get(k))
    when = (provenance.get("time") or "")[:10]
    return "; ".join(parts) + (f"; {versions}" if versions else "") + (f" ({when})" if when else "")


# ---- timing ----

class Stopwatch:
    """Seconds spent inside a `with` block (perf_counter)."""

    def __init__(self):
        self.seconds, self._t0 = 0.0, None

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        return False


@contextlib.contextmanager
def cli_sweep(sweep: str, extra: list[str]):
    """Run `python -m lora_search sweep=<sweep> *extra` as a user does, in a fresh results folder; yield (seconds,
    the study's folder, the study). SystemExit with the tail of stderr when it fails."""
    import subprocess
    import tempfile

    import optuna

    with tempfile.TemporaryDirectory(prefix=f"lora-search-{sweep}-") as tmp:
        cmd = [sys.executable, "-m", "lora_search", f"sweep={sweep}", f"results_dir={tmp}", *extra]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        out = Path(tmp) / sweep
        yield wall, out, optuna.load_study(study_name=sweep, storage=f"sqlite:///{out / 'study.db'}")


def median(values) -> float | None:
    """The median of the numbers given (None when there are none)."""
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def rounded(value, digits: int = 3):
    """A float rounded for a record; anything else unchanged."""
    return round(value, digits) if isinstance(value, float) else value


def fmt(value, pattern: str = ".4f", missing: str = "-") -> str:
    """A number formatted with `pattern`, or `missing` when it is not a number."""
    return format(value, pattern) if isinstance(value, (int, float)) and not isinstance(value, bool) else missing


def torch_threads() -> int:
    """The CPU threads torch computes with."""
    import torch

    return torch.get_num_threads()


@contextlib.contextmanager
def threads(n: int | None):
    """torch's CPU threads set to n for the block (unchanged when n is None), restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def configure_logging() -> None:
    """Progress lines on stderr, as `python -m lora_search` shows them; library chatter kept down."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def quiet_optuna():
    """Optuna's one log line per trial off (the scripts print their own)."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


# ---- the sweep every approach runs ----

def trial_base(cfg: RunConfig) -> RunConfig:
    """The composed config with the sweep's short-trial budget applied (max_steps, eval cadence, ...), as a trial
    starts from it."""
    from lora_search.config import space as space_lib

    return space_lib.trial_base(cfg)


def sample(trial, cfg: RunConfig) -> dict:
    """Sample the sweep's space from an Optuna trial, with lora_search's own names and order."""
    from lora_search.config import space as space_lib

    return space_lib.suggest(trial, cfg.sweep.space)


def trial_config(base: RunConfig, params: dict) -> RunConfig:
    """A trial's config: sampled values applied by dotted key (alpha = alpha_ratio * r, targets as presets)."""
    from lora_search.config import space as space_lib

    return space_lib.apply(base, params)


def sampler(cfg: RunConfig):
    """A fresh sampler as the sweep file names it (TPE, seed 0, its n_startup_trials and multivariate)."""
    from lora_search.search import study as study_lib

    return study_lib.make_sampler(cfg)


def spec(value) -> dict:
    """A sampler or pruner setting (a name, or {type: name, **kwargs}) as a dict, for the record."""
    return {"type": value} if isinstance(value, str) else dict(value)


def lora_config(tcfg: RunConfig):
    """PEFT's LoraConfig for a trial: the presets mapped to module names exactly as lora_search maps them."""
    from lora_search.models import adapters

    return adapters.lora_config(tcfg.lora, tcfg.model)


# Training settings a peer takes from lora_search's own SFTConfig, so they are the same by construction.
SHARED_ARGS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim",
               "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
               "max_steps", "max_length", "packing", "seed", "data_seed", "logging_steps", "completion_only_loss")


def peer_sft_args(tcfg: RunConfig, out_dir: Path, precision: str = "trl"):
    """TRL's SFTConfig as a hand-written recipe sets it: lora_search's training settings (learning rate,
    schedule, batch sizes, max_length, loss on completions, seed, logging) with evals of the whole eval set
    every `eval_every` steps, and the precision left to TRL's defaults (`trl`) or forced to fp32 (`fp32`)."""
    import torch
    from trl import SFTConfig

    from lora_search.train.run import sft_config

    ours = sft_config(tcfg, Path(out_dir), [])
    kwargs = {key: getattr(ours, key) for key in SHARED_ARGS}
    kwargs.update(output_dir=str(out_dir), eval_strategy="steps", eval_steps=tcfg.trainer.eval_every,
                  save_strategy="no", report_to="none")
    if precision == "fp32":
        kwargs.update(bf16=False, fp16=False)
    elif not torch.cuda.is_available():
        # SFTConfig defaults to bf16=True; on a machine without a GPU, TrainingArguments then refuses to start
        # ("Your setup doesn't support bf16/gpu. You need to assign use_cpu ...") until use_cpu is set.
        kwargs["use_cpu"] = True
    return SFTConfig(**kwargs)


def precision_label(args, weights_dtype) -> str:
    """What a TrainingArguments trains in: bf16/fp16 mixed precision (autocast) or plain weights."""
    dtype = str(weights_dtype).replace("torch.", "")
    if args.bf16:
        return f"bf16 autocast over {dtype} weights"
    if args.fp16:
        return f"fp16 mixed over {dtype} weights"
    return dtype


# ---- runs: approaches side by side ----

FIGURES = ("setup_s", "train_step_s", "eval_s", "wall_s")


def summarize(wall_s: float, study, timings: dict, extra: dict) -> dict:
    """An approach's figures from its Optuna study and per-trial timings ({trial number: {figure: seconds}}):
    wall time, trial states, its own best value and params, per-trial totals and means, every trial."""
    trials = []
    for frozen in study.get_trials(deepcopy=False):
        row = {"number": frozen.number, "state": frozen.state.name.lower(), "params": frozen.params,
               "value": frozen.value}
        row.update({k: rounded(v) for k, v in timings.get(frozen.number, {}).items() if k in FIGURES + (
            "evals", "steps", "pruned_at_step")})
        trials.append(row)
    states = [t["state"] for t in trials]
    complete = [t for t in trials if t["state"] == "complete"]
    best = min(complete, key=lambda t: t["value"]) if complete else None
    totals, means = {}, {}
    for key in FIGURES:
        known = [t[key] for t in trials if isinstance(t.get(key), (int, float))]
        totals[key] = rounded(sum(known)) if known else None
        means[key] = rounded(sum(known) / len(known)) if known else None
    return {
        "wall_s": rounded(wall_s),
        "n_trials": len(trials),
        "complete": states.count("complete"),
        "pruned": states.count("pruned"),
        "failed": states.count("fail"),
        "best_trial": best["number"] if best else None,
        "best_value": best["value"] if best else None,
        "best_params": best["params"] if best else None,
        "trial_totals_s": totals,
        "trial_means_s": means,
        "outside_trials_s": rounded(wall_s - (totals["wall_s"] or 0.0)),  # loads, tokenizing, sampling, storage
        **extra,
        "trials": trials,
    }


def _combine(runs: list[dict]) -> dict:
    """One approach over its repeats: the first good run's figures, wall time the median of the good runs."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    out = dict(good[0])
    if len(runs) > 1:
        out["wall_s_runs"] = [r.get("wall_s") for r in runs]
        out["wall_s"] = rounded(median(r["wall_s"] for r in good))
        out["errors"] = [r["error"] for r in runs if "error" in r]
    return out


def alternate(runners: dict, repeats: int, *args, combine=None) -> tuple[dict, list[str]]:
    """Run each runner(*args, repeat) `repeats` times, in the given order then reversed, and so on (against
    drift in machine noise); a runner that raises is recorded with its error, the others still run.
    Returns ({name: combine(its runs)}, the order they ran in); combine defaults to the first good run's
    figures with the median wall time."""
    names = list(runners)
    runs: dict[str, list] = {name: [] for name in names}
    order = []
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            logging.getLogger("bench").info("== %s (repeat %d of %d)", name, r + 1, repeats)
            order.append(name)
            try:
                runs[name].append(runners[name](*args, r))
            except Exception as e:  # one approach failing must not lose the others' figures
                logging.getLogger("bench").exception("%s failed", name)
                runs[name].append({"error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc(limit=6)[-3000:]})
    return {name: (combine or _combine)(runs[name]) for name in names}, order
