"""The main job: search -> promote -> merge -> benchmark -> report, each stage reading what the
previous one wrote to results/<study>/, so any stage can be re-run alone and finished ones are
skipped on a second run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import sys
import time
from collections import OrderedDict

from lora_search.checks import space as space_checks
from lora_search.checks.run_config import validate
from lora_search.commands import nightly, train_stage
from lora_search.config import space as space_lib
from lora_search.config.schema import RunConfig
from lora_search.core import hardware, records
from lora_search.core.errors import ConfigError, RunDiverged
from lora_search.models import adapters, loaders
from lora_search.models.adapters import init_adapter_dir
from lora_search.promote import benchmark, merge
from lora_search.promote.promotion import config_id, load_best, promote_stage
from lora_search.report import study_report, wandb_summary
from lora_search.scale import promotion_claim
from lora_search.search import failures, interrupts, memory_budget
from lora_search.search.study import check_sweep, open_study, search_stage, study_dir
from lora_search.train import tracking
from lora_search.train.run import Worker

log = logging.getLogger(__name__)
ORDER = ("search", "promote", "merge", "benchmark", "report")


class Workers:
    """The bases and data a run's trials ask for, loaded on first use: a base per (model, quantization), at most
    `max_bases` kept (least recently used released: real bases are GBs), data per distinct data config."""

    def __init__(self, cfg: RunConfig, max_bases: int = 1):
        self.cfg, self.max_bases = cfg, max_bases
        self._bases: OrderedDict = OrderedDict()  # base_key -> Base, least recently used first
        self._data: dict = {}  # repr(data config) -> TaskData
        self._workers: dict = {}  # (base_key, data key) -> Worker (its tokenized copies and baseline)

    def data_for(self, cfg: RunConfig | None = None):
        """The task data of cfg's data settings, loaded once per distinct data config."""
        cfg = cfg or self.cfg
        key = repr(cfg.data)
        if key not in self._data:
            self._data[key], _ = train_stage.preflight(cfg)
        return self._data[key]

    def task_data(self):
        """The composed config's task data, loaded once."""
        return self.data_for(self.cfg)

    def get(self, cfg: RunConfig | None = None) -> Worker:
        """A worker whose base matches cfg's model and quantization and whose data matches cfg's data settings."""
        cfg = cfg or self.cfg
        bkey, dkey = base_key(cfg), repr(cfg.data)
        if bkey in self._bases:
            self._bases.move_to_end(bkey)
        else:
            data = self.data_for(cfg)
            while len(self._bases) >= max(self.max_bases, 1):
                self._evict(next(iter(self._bases)))
            worker = train_stage.start_worker(cfg, data)
            self._bases[bkey] = worker.base
            self._workers[(bkey, dkey)] = worker
        if (bkey, dkey) not in self._workers:
            self._workers[(bkey, dkey)] = Worker(base=self._bases[bkey], data=self.data_for(cfg))
        return self._workers[(bkey, dkey)]

    def _evict(self, bkey) -> None:
        """Release a base: drop every reference this holds, unfreeze so cycles among its objects can go, collect."""
        log.info("releasing base %s to load another", self._bases[bkey].name)
        del self._bases[bkey]
        for key in [k for k in self._workers if k[0] == bkey]:
            del self._workers[key]
        gc.unfreeze()  # start_worker froze the base out of the collector's walks
        hardware.release_memory()
        hardware.freeze_long_lived()


def base_key(cfg: RunConfig) -> str:
    """What a loaded base depends on: the model's weights and dtype, the quantization (and, for a quantized base,
    gradient checkpointing, which peft's k-bit preparation sets on the model)."""
    m = cfg.model
    model = (m.name, m.source, m.path, m.revision, m.gguf_package, m.gguf_file, m.dtype, m.attn_implementation,
             m.trust_remote_code, repr(m.tiny))
    quant = (repr(cfg.quant), cfg.trainer.gradient_checkpointing) if cfg.quant.mode != "none" else "none"
    return repr((model, quant))


def preflight_sweep(cfg: RunConfig) -> None:
    """Everything checkable before training: config, sweep file, and every target preset the space can pick (on
    every model it can pick)."""
    validate(cfg)
    check_sweep(cfg)
    metas, archs = {}, {}
    trial_cfg = space_lib.trial_base(cfg)
    memory_budget.budget_mb(cfg)  # auto: the free memory now, before any base loads
    over = []  # per model/quantization the space can pick: a budget below the base's own weights fits nothing
    for corner in [{}] + space_checks.corners(cfg.sweep.space):
        if corner and not any(k.startswith(("lora.", "model.", "quant.")) for k in corner):
            continue
        corner_cfg = space_lib.apply(trial_cfg, corner)
        key = repr(corner_cfg.model)
        if key not in metas:
            archs[key] = loaders.architecture(corner_cfg.model, cfg.cache_dir)
            metas[key] = loaders.meta_model(archs[key])
        over.append(memory_budget.base_problem(corner_cfg, archs[key]))
        adapters.check_targets(corner_cfg.lora, corner_cfg.model, metas[key])
        if corner_cfg.trainer.init_adapter:
            start = init_adapter_dir(corner_cfg.trainer.init_adapter, corner_cfg.results_dir)[0]
            problems = adapters.check_start(start, metas[key])
            if problems:
                raise ConfigError(problems)
    if over and all(over):  # every base the space can pick is over the budget (one line: the composed one's)
        raise ConfigError(over[0])


@contextlib.contextmanager
def timed(out, stage: str):
    """Append the wall seconds this process spent on a stage (and when it ended) to out/timings.json, one list per
    stage, every run kept (a stage found done costs its check): what `benchmarks/default_sweep.py` reads for each
    stage's share of a sweep's time."""
    t0 = time.perf_counter()
    yield
    seconds = round(time.perf_counter() - t0, 1)
    found = records.read_json(out / "timings.json") or {}
    entry = {"seconds": seconds, "ended": round(time.time(), 3)}
    records.write_json(out / "timings.json", {**found, stage: [*found.get(stage, []), entry]})
    log.info("%s took %.1f min", stage, seconds / 60)


def _stage_done(out, stage: str, cid: str) -> bool:
    done = records.read_json(out / "stages.json") or {}
    return done.get(stage) == cid


def _mark_done(out, stage: str, cid: str) -> None:
    done = records.read_json(out / "stages.json") or {}
    records.write_json(out / "stages.json", {**done, stage: cid})


def run(cfg: RunConfig, overrides: list[str] = ()) -> int:
    """Run the stage(s) cfg.stage names, or a night of a nightly sweep; return the exit code.

    `overrides` (the command line) let extra workers compose the same run. SIGINT and SIGTERM stop it cleanly
    (exit 130 / 143, the running trial recorded as interrupted); a sweep whose trials keep failing exits 4.
    """
    with interrupts.signals_handled():
        try:
            return _run(cfg, overrides)
        except (KeyboardInterrupt, failures.TooManyFailures) as e:
            return interrupts.exit_code(e)
        except RunDiverged as e:  # recorded (status failed, metrics kept); one line, no traceback
            print(f"error: {e}; lower trainer.learning_rate or set trainer.max_grad_norm", file=sys.stderr)
            return 1


def _run(cfg: RunConfig, overrides: list[str] = ()) -> int:
    t0 = time.perf_counter()
    stages = ORDER if cfg.stage == "all" else (cfg.stage,)
    explicit = cfg.stage != "all"
    preflight_sweep(cfg)
    out = study_dir(cfg)
    workers = Workers(cfg)
    records.write_config(out / "sweep.yaml", cfg)
    if cfg.sweep.nightly.enabled and cfg.stage == "all":
        return nightly.run_night(cfg, workers.get, overrides)
    if "search" in stages:
        with timed(out, "search"):
            study = search_stage(cfg, workers.get, overrides)
    else:
        study = open_study(cfg)
    if explicit or cfg.force:  # the user's own call: no claim
        return _later_stages(cfg, stages, study, workers, out, t0)
    promotion_claim.wait_for_search(study, out)
    claim = promotion_claim.take(study, cfg, str(out.resolve()))
    if not claim.mine:
        a = claim.attrs
        if not (a.get("state") == promotion_claim.DONE and a.get("host") == socket.gethostname()
                and a.get("results_dir") == str(out.resolve())):
            log.info("study %s: the promotion is claimed by %s: this process stops here (exit 0)", cfg.sweep.name,
                     promotion_claim.describe(claim))
            return 0
        # done earlier on this machine into these results: the finished stages are skipped below
        return _later_stages(cfg, stages, study, workers, out, t0)
    log.info("study %s: this process promotes (claim %s)", cfg.sweep.name, claim.name)
    with promotion_claim.holding(study, claim, cfg.sweep.heartbeat_s):
        return _later_stages(cfg, stages, study, workers, out, t0)


def _later_stages(cfg: RunConfig, stages, study, workers: Workers, out, t0: float) -> int:
    """Promote, merge, benchmark and report (those in `stages`), skipping the ones done for this promoted run."""
    explicit = cfg.stage != "all"
    if "promote" in stages:
        with timed(out, "promote"):
            promote_stage(cfg, study, workers.get, force=cfg.force or explicit)
    for name in ("merge", "benchmark"):
        if name not in stages:
            continue
        fn = getattr({"merge": merge, "benchmark": benchmark}[name], f"{name}_stage")
        full_cfg = load_best(out)
        cid = config_id(full_cfg)
        if _stage_done(out, name, cid) and not (cfg.force or explicit):
            log.info("%s already done for this promoted run: skipped", name)
            continue
        log.info("%s ...", name)
        with timed(out, name):
            result = fn(full_cfg, out, workers.data_for(full_cfg))
            if name == "benchmark":
                tracking.log_benchmark(full_cfg, out, result)
        _mark_done(out, name, cid)
    if "report" in stages:
        with timed(out, "report"):
            path = study_report.write_report(study, cfg, out)
            wandb_summary.log_study(study, cfg, out)
            summarize(study, cfg, out)
        log.info("report: %s (%.1f min in all)", path, (time.perf_counter() - t0) / 60)
    return 0


def summarize(study, cfg: RunConfig, out) -> None:
    """Print the trial table and the headline numbers."""
    header, rows = study_report.trial_rows(study, cfg.sweep.metric)
    print("\n" + study_report.table(header, rows) + "\n")
    bench = records.read_json(out / "benchmark.json")
    if bench and "base" in bench and "tuned" in bench:
        for key in ("eval_loss", "exact_match", "rouge_l", "bleu", "preference_accuracy"):
            base, tuned = bench["base"].get(key), bench["tuned"].get(key)
            if base is not None and tuned is not None:
                print(f"{key}: base {base:.4f} -> tuned {tuned:.4f}")
    print(f"report: {out / 'report.md'}")
