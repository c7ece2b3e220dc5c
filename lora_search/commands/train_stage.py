"""Stage `train`: check everything that can be checked without weights, load once, train one
adapter, and write `results/runs/<run name>/`.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from pathlib import Path

from lora_search.checks.run_config import validate
from lora_search.checks.task_data import check_kind, task_data
from lora_search.config.schema import RunConfig
from lora_search.core import hardware, records
from lora_search.core.errors import ConfigError, RunDiverged
from lora_search.data import quality_report
from lora_search.models import adapters, loaders
from lora_search.models.adapters import init_adapter_dir
from lora_search.train import tracking
from lora_search.train.run import Worker, train_adapter

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig):
    """Validate the config, load the data and check targets on the meta device: all before any weight loads."""
    validate(cfg)
    data = task_data(cfg.data)  # loaded once: the pre-Hydra checks and the run share it
    check_kind(cfg, data)
    arch = loaders.architecture(cfg.model, cfg.cache_dir)
    meta = loaders.meta_model(arch)
    adapters.check_targets(cfg.lora, cfg.model, meta)
    if cfg.trainer.init_adapter:
        problems = adapters.check_start(init_adapter_dir(cfg.trainer.init_adapter, cfg.results_dir)[0], meta)
        if problems:
            raise ConfigError(problems)
    log.info("data: %d train rows, %d eval rows (%s layout)", len(data.train), len(data.eval), data.layout)
    for line in quality_report.render(data.report).splitlines()[:2]:
        log.info("data: %s", line)
    return data, meta


_reported: dict = {}  # data report path -> fingerprint written there by this process


def record_data(cfg: RunConfig, data, tokenizer, path: Path | None = None) -> dict:
    """Count the data's tokens as TRL will (truncation at trainer.max_length), warn on truncation or leakage, and
    write the data report to path (a second, different data set in one sweep goes to data_report-<fingerprint>)."""
    report = data.report
    if report.get("tokens", {}).get("max_length") != cfg.trainer.max_length:
        quality_report.add_tokens(report, data, tokenizer, cfg.trainer.max_length)
        quality_report.warn(report)
    if path is not None:
        if _reported.setdefault(path, data.fingerprint) != data.fingerprint:
            path = path.with_name(f"{path.stem}-{data.fingerprint[:12]}.json")
        records.write_json(path, {"fingerprint": data.fingerprint, **report})
    return report


def start_worker(cfg: RunConfig, data=None) -> Worker:
    """Preflight (unless data is given), then load the base model once."""
    if data is None:
        data, _ = preflight(cfg)
    base = loaders.load_base(cfg.model, cfg.quant, cfg.cache_dir, cfg.trainer.gradient_checkpointing)
    sweep_report = None if cfg.stage == "train" else Path(cfg.results_dir) / cfg.sweep.name / "data_report.json"
    record_data(cfg, data, base.tokenizer, sweep_report)
    for package in ("peft", "trl", *(("wandb",) if tracking.enabled(cfg) else ())):
        importlib.import_module(package)  # what every trial uses: paid here, not by the first trial, and frozen
    worker = Worker(base=base, data=data)
    hardware.freeze_long_lived()
    return worker


def run_name(cfg: RunConfig) -> str:
    """The run's folder name: run_name, else <model>-<lora>-<quant>-<time>."""
    if cfg.run_name:
        return cfg.run_name
    quant = f"-{cfg.quant.name}" if cfg.quant.mode != "none" else ""
    return f"{cfg.model.name}-{cfg.lora.name}{quant}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_stage(cfg: RunConfig) -> Path:
    """Train one adapter on the configured model and data; return the run folder."""
    t0 = time.perf_counter()
    data, _ = preflight(cfg)
    run_dir = Path(cfg.results_dir) / "runs" / run_name(cfg)
    records.write_config(run_dir / "config.yaml", cfg)
    records.write_status(run_dir, "running")
    run = tracking.start(cfg, run_dir, run_dir.name, "train", group="train")
    try:
        worker = start_worker(cfg, data)
        metrics = train_adapter(worker, cfg, run_dir, callbacks=[tracking.StepLogger(run)])
    except BaseException as e:
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        records.write_status(run_dir, "failed", reason=reason)
        tracking.finish(run, {"status": "failed"}, tags=["failed", reason], exit_code=1)
        raise
    metrics["load_s"] = worker.base.load_s
    metrics["wall_s"] = time.perf_counter() - t0
    metrics["data_fingerprint"] = data.fingerprint
    metrics.update(quality_report.summary(data.report))
    records.write_json(run_dir / "data_report.json", {"fingerprint": data.fingerprint, **data.report})
    records.write_json(run_dir / "metrics.json", metrics)
    if metrics.get("diverged"):  # trained to the end, but its loss is NaN or infinite: no adapter to hand over
        records.write_status(run_dir, "failed", reason=metrics["diverged"])
        tracking.finish(run, {**metrics, "status": "failed"}, tags=["failed", "diverged"], exit_code=1)
        raise RunDiverged(metrics["diverged"], run_dir)
    records.write_status(run_dir, "complete")
    tracking.log_dir_artifact(run, run_dir / "adapter", f"adapter-{run_dir.name}", "model", metrics)
    tracking.finish(run, {**metrics, "status": "complete"}, tags=["complete"])
    log.info("%s", summary_line(cfg.trainer.method, metrics))
    log.info("wrote %s", run_dir)
    return run_dir


def _pct(value) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _num(value, pattern: str = ".4f") -> str:
    return format(value, pattern) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def summary_line(method: str, m: dict) -> str:
    """A finished run in one line, by what its method measures (a missing figure shows as '-', never an error)."""
    tail = f"; {_num(m.get('wall_s'), '.1f')} s in all"
    if method == "dpo":
        return (f"eval DPO loss {_num(m.get('eval_loss'))}, reward accuracy {_pct(m.get('reward_accuracy'))}; "
                f"preference accuracy {_pct(m.get('preference_accuracy'))} (base {_pct(m.get('base_preference_accuracy'))}) "
                f"on {m.get('preference_pairs', '-')} eval pairs{tail}")
    if method in ("grpo", "rloo"):
        return (f"held-out reward {_num(m.get('reward'), '.3f')} (base {_num(m.get('base_reward'), '.3f')}), exact "
                f"match {_pct(m.get('exact_match'))} (base {_pct(m.get('base_exact_match'))}), KL to the reference "
                f"{_num(m.get('kl'))}{tail}")
    em, base_em = m.get("exact_match"), m.get("base_exact_match")
    rouge, base_rouge = m.get("rouge_l"), m.get("base_rouge_l")
    return (f"eval loss {_num(m.get('eval_loss'))} (base {_num(m.get('base_eval_loss'))})"
            + (f"; exact match {_pct(em)} (base {_pct(base_em)})" if em is not None and base_em is not None else "")
            + (f"; ROUGE-L {rouge:.3f}, BLEU {_num(m.get('bleu'), '.1f')} (base {base_rouge:.3f}, "
               f"{_num(m.get('base_bleu'), '.1f')})" if rouge is not None and base_rouge is not None else "")
            + f"; {m.get('train_tokens_per_s') or 0:.0f} train tokens/s{tail}")
