"""Weights & Biases: one run per trial (grouped by study, job type `trial`), one for the full
training run (adapter as an artifact), one for the benchmark and one sweep summary.

tracking.mode=auto (the default): online when WANDB_API_KEY is set, else offline under results/<study>/wandb/
(`wandb sync` uploads them later); an explicit offline, online or disabled is always honoured. Tracking never
fails a trial: the first W&B error is logged once as a warning, and from then on this process stops calling W&B.
Secrets are masked in what W&B receives: the config, summary strings and tags.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

from lora_search.config.schema import RunConfig
from lora_search.core import masking, records

log = logging.getLogger(__name__)
_broken: list[str] = []  # the first failure, once W&B has failed in this process
TAG_MAX = 64  # W&B rejects longer tags


def _safe(fn):
    """Call fn; on any error warn once, disable tracking for the process and return None."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never fail a trial
            _broken.append(f"{type(e).__name__}: {e}")
            log.warning("W&B tracking failed and is off for the rest of this run (%s: %s); the sweep goes on",
                        type(e).__name__, e)
            return None
    return wrapper


def enabled(cfg: RunConfig) -> bool:
    """True when runs should be written (backend wandb, mode not disabled, no earlier failure)."""
    return cfg.tracking.backend == "wandb" and cfg.tracking.mode != "disabled" and not _broken


def mode(cfg: RunConfig) -> str:
    """tracking.mode as given; auto: online when WANDB_API_KEY is set, else offline."""
    if cfg.tracking.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return cfg.tracking.mode


def _tags(tags) -> list[str]:
    return [masking.mask(str(t))[:TAG_MAX] for t in tags if t]


def _scalars(metrics: dict, prefix: str = "") -> dict:
    """Flatten a metrics dict to the finite numbers and short strings W&B charts."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalars(value, name + "/"))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, (int, float)):
            if math.isfinite(value):
                out[name] = value
        elif isinstance(value, str) and len(value) < 200:
            out[name] = masking.mask(value)
    return out


@_safe
def start(cfg: RunConfig, run_dir: Path, name: str, job_type: str, config: dict | None = None, tags=(),
          group: str | None = None):
    """Start a run (or return None when tracking is off); its files go under run_dir/wandb/."""
    if not enabled(cfg):
        return None
    import wandb

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _own_service()
    full = {**records.config_dict(cfg), **records.masked(config or {})}  # secrets masked
    return wandb.init(
        project=cfg.tracking.project, entity=cfg.tracking.entity, dir=str(run_dir), name=name,
        group=group or cfg.sweep.name, job_type=job_type, config=full, tags=_tags([*cfg.tracking.tags, *tags]),
        mode=mode(cfg), reinit="create_new",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                save_code=False, x_disable_meta=_argv_has_secrets()),
    )


def _own_service() -> None:
    """Have this process start its own W&B service instead of joining one inherited from a parent process.

    wandb saves its service's address in $WANDB_SERVICE (`<version>-<pid of the process that started it>-...`), so a
    child process joins its parent's service, which it neither owns nor waits for: the parent's service then goes on
    writing this command's run files and debug logs under results/ after the command has returned. A service this
    process starts is torn down by wandb's exit hook (`wandb.teardown()`), which waits for it to finish writing."""
    from wandb import env

    token = os.environ.get(env.SERVICE)
    if token and token.split("-", 2)[1:2] != [str(os.getpid())]:
        os.environ.pop(env.SERVICE)


def _argv_has_secrets() -> bool:
    """W&B's run metadata records sys.argv: leave the metadata out when the command line holds a secret."""
    line = "\0".join(sys.argv)
    return masking.mask(line) != line


@_safe
def log_metrics(run, metrics: dict, step: int | None = None) -> None:
    """Log numbers at a step."""
    if run is not None:
        run.log(_scalars(metrics), step=step)


@_safe
def finish(run, summary: dict | None = None, tags=(), exit_code: int = 0) -> None:
    """Write the final summary, add tags (status, reason) and close the run."""
    if run is None:
        return
    run.summary.update(_scalars(summary or {}))
    if tags:
        run.tags = tuple(dict.fromkeys([*run.tags, *_tags(tags)]))
    run.finish(exit_code=exit_code)


@_safe
def log_dir_artifact(run, path: Path, name: str, kind: str, metadata: dict | None = None) -> None:
    """Log a folder (an adapter) as an artifact."""
    if run is None or not Path(path).exists():
        return
    import wandb

    art = wandb.Artifact(name, type=kind, metadata=_scalars(metadata or {}))
    art.add_dir(str(path))
    run.log_artifact(art)


@_safe
def log_table(run, key: str, columns: list[str], rows: list[list]) -> None:
    """Log a table (importances, benchmark side by side)."""
    if run is None:
        return
    import wandb

    run.log({key: wandb.Table(columns=columns, data=[[_plain(c) for c in r] for r in rows])})


@_safe
def log_images(run, images: dict) -> None:
    """Log PNG files (the report's plots) as images."""
    if run is None:
        return
    import wandb

    run.log({f"plots/{k}": wandb.Image(str(p)) for k, p in images.items() if Path(p).exists()})


def _plain(value):
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return str(value)


class StepLogger(TrainerCallback):
    """Send the trainer's logs (loss, learning rate, eval loss) to a run, keyed by optimizer step."""

    def __init__(self, run):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is not None and logs:
            named = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in logs.items()}
            log_metrics(self.run, named, step=state.global_step)


BENCH_FIELDS = ("eval_loss", "perplexity", "exact_match", "rouge_l", "bleu", "preference_accuracy", "logp_margin",
                "reward_accuracy", "reward_margin", "latency_p50_s", "latency_p95_s", "tokens_per_s", "peak_memory_mb",
                "size_mb")


def log_benchmark(cfg: RunConfig, out: Path, bench: dict) -> None:
    """One run (job type `benchmark`): every model's numbers in the summary and a side-by-side table."""
    run = start(cfg, out, f"benchmark-{cfg.sweep.name}", "benchmark")
    names = [n for n in ("base", "tuned", "adapter", "int8_dynamic") if isinstance(bench.get(n), dict)]
    rows = [[field, *[bench[n].get(field) for n in names]] for field in BENCH_FIELDS
            if any(bench[n].get(field) is not None for n in names)]
    log_table(run, "benchmark", ["metric", *names], rows)
    finish(run, {n: bench[n] for n in names})


def log_sweep_summary(cfg: RunConfig, out: Path, summary: dict, importances: dict, plots: dict) -> None:
    """One run (job type `summary`): best params and value, the importance table, the report's plots."""
    run = start(cfg, out, f"summary-{cfg.sweep.name}", "summary",
                {"best_params": summary.get("best_params") or {}})
    intervals = summary.get("importance_intervals") or {}
    log_table(run, "importance", ["param", "importance", "low", "high"],
              [[k, v, *(intervals.get(k) or [None, None])] for k, v in importances.items()])
    log_images(run, plots)
    finish(run, {**{k: v for k, v in summary.items() if k != "best_params"},
                 **{f"best_params/{k}": v for k, v in (summary.get("best_params") or {}).items()},
                 **({} if "importances" in summary else {f"importances/{k}": v for k, v in importances.items()})})
