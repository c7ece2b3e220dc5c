"""The main job: search -> promote -> merge -> benchmark -> report, each stage reading what the
previous one wrote to results/<study>/, so any stage can be re-run alone and finished ones are
skipped on a second run.
"""

from __future__ import annotations

import importlib
import logging
import time

from lora_search import adapters, models, records, report, runs, tracking
from lora_search import trial as space_lib
from lora_search.promote import config_id, load_best, promote_stage
from lora_search.schema import RunConfig
from lora_search.study import check_sweep, open_study, search_stage, study_dir
from lora_search.validate import validate

log = logging.getLogger(__name__)
ORDER = ("search", "promote", "merge", "benchmark", "report")


class Workers:
    """Loads data once and a base model once per (model, quantization), on first use."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.data, self._workers = cfg, None, {}

    def task_data(self):
        """The task data, loaded once."""
        if self.data is None:
            self.data, _ = runs.preflight(self.cfg)
        return self.data

    def get(self, cfg: RunConfig | None = None):
        """A worker whose base matches cfg's model and quantization (loaded at most once)."""
        cfg = cfg or self.cfg
        key = (repr(cfg.model), repr(cfg.quant))
        if key not in self._workers:
            self._workers[key] = runs.start_worker(cfg, self.task_data())
        return self._workers[key]


def preflight_sweep(cfg: RunConfig) -> None:
    """Everything checkable before training: config, sweep file, and every target preset the space can pick."""
    validate(cfg)
    check_sweep(cfg)
    meta = models.meta_model(models.architecture(cfg.model, cfg.cache_dir))
    trial_cfg = space_lib.apply(cfg, dict(cfg.sweep.trial))
    for corner in space_lib.corners(cfg.sweep.space):
        if any(k.startswith("lora.") for k in corner):
            lora_cfg = space_lib.apply(trial_cfg, corner)
            adapters.check_targets(lora_cfg.lora, lora_cfg.model, meta)


def _stage_done(out, stage: str, cid: str) -> bool:
    done = records.read_json(out / "stages.json") or {}
    return done.get(stage) == cid


def _mark_done(out, stage: str, cid: str) -> None:
    done = records.read_json(out / "stages.json") or {}
    records.write_json(out / "stages.json", {**done, stage: cid})


def run(cfg: RunConfig, overrides: list[str] = ()) -> int:
    """Run the stage(s) cfg.stage names, or a night of a nightly sweep; return the exit code.

    `overrides` (the command line) let extra workers compose the same run.
    """
    t0 = time.perf_counter()
    stages = ORDER if cfg.stage == "all" else (cfg.stage,)
    explicit = cfg.stage != "all"
    preflight_sweep(cfg)
    out = study_dir(cfg)
    workers = Workers(cfg)
    records.write_config(out / "sweep.yaml", cfg)
    if cfg.sweep.nightly.enabled and cfg.stage == "all":
        from lora_search import nightly

        return nightly.run_night(cfg, workers.get, overrides)
    study = search_stage(cfg, workers.get, overrides) if "search" in stages else open_study(cfg)
    if "promote" in stages:
        promote_stage(cfg, study, lambda: workers.get(load_best(out)), force=cfg.force or explicit)
    for name in ("merge", "benchmark"):
        if name not in stages:
            continue
        fn = getattr(importlib.import_module(f"lora_search.{name}"), f"{name}_stage")
        full_cfg = load_best(out)
        cid = config_id(full_cfg)
        if _stage_done(out, name, cid) and not (cfg.force or explicit):
            log.info("%s already done for this promoted run: skipped", name)
            continue
        log.info("%s ...", name)
        result = fn(full_cfg, out, workers.task_data())
        if name == "benchmark":
            tracking.log_benchmark(full_cfg, out, result)
        _mark_done(out, name, cid)
    if "report" in stages:
        path = report.write_report(study, cfg, out)
        tracking.log_study(study, cfg, out)
        summarize(study, cfg, out)
        log.info("report: %s (%.1f min in all)", path, (time.perf_counter() - t0) / 60)
    return 0


def summarize(study, cfg: RunConfig, out) -> None:
    """Print the trial table and the headline numbers."""
    header, rows = report.trial_rows(study, cfg.sweep.metric)
    print("\n" + report.table(header, rows) + "\n")
    bench = records.read_json(out / "benchmark.json")
    if bench and "base" in bench and "tuned" in bench:
        for key in ("eval_loss", "exact_match"):
            base, tuned = bench["base"].get(key), bench["tuned"].get(key)
            if base is not None and tuned is not None:
                print(f"{key}: base {base:.4f} -> tuned {tuned:.4f}")
    print(f"report: {out / 'report.md'}")
