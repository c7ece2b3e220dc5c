"""`python -m lora_search [command] [overrides]`: Hydra composes the run, the chosen stage runs.

Commands (first argument, optional):
  (none)      the sweep: search -> promote -> merge -> benchmark -> report (or `stage=...`)
  report      regenerate results/<study>/report.md, its plots and report.html from the storage
  dashboard   serve optuna-dashboard for the study's storage (127.0.0.1 unless dashboard.host is set)
  compare     a table of several studies or nights side by side: `compare rank_lr targets`
  preview     rows exactly as the model will see them (completion marked), the data report, token counts
  storage-proxy  Optuna's gRPC storage proxy in front of one database, for hundreds of workers
              (`storage-proxy --storage postgresql+psycopg://... --port 13000`; workers: sweep.storage=grpc://host:port)

Overrides are checked against the config groups and the schema before Hydra composes, and
every config problem is reported as one line (no traceback) with exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys

from lora_search.core.errors import LoraSearchError, RunDiverged

log = logging.getLogger("lora_search")
EXIT_USAGE = 2
COMMANDS = ("report", "dashboard", "compare", "preview", "storage-proxy")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import warnings

    warnings.filterwarnings("ignore", message=".*kernels.*")
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()  # per-map bars drown the training progress


def report(error: LoraSearchError) -> None:
    """Print a user error: one line per problem, no traceback."""
    if len(error.problems) == 1:
        print(f"error: {error.problems[0]}", file=sys.stderr)
    else:
        print(f"error: {len(error.problems)} problems in the configuration:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)


def run(cfg) -> None:
    """Run the stage a composed config names."""
    from hydra.core.hydra_config import HydraConfig

    from lora_search.checks.run_config import validate
    from lora_search.commands import pipeline, train_stage
    from lora_search.config import compose
    from lora_search.search import interrupts  # loads torch: only a run needs it

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    _sweep_note(hydra_cfg.runtime.choices.get("sweep"))
    run_cfg = compose.to_run_config(cfg, overrides)  # a mapping on the command line replaces the file's
    if run_cfg.stage == "train":
        with interrupts.signals_handled():  # Ctrl-C / SIGTERM: the run folder says failed (interrupted), exit 130 / 143
            try:
                train_stage.train_stage(run_cfg)
            except KeyboardInterrupt as e:
                sys.exit(interrupts.exit_code(e, resumable=False))
            except RunDiverged as e:  # trained, recorded (status failed, its NaN metrics kept): no traceback
                print(f"error: the run {e}; lower trainer.learning_rate or set trainer.max_grad_norm",
                      file=sys.stderr)
                sys.exit(1)
    else:
        validate(run_cfg)
        # the user's config folders (--config-dir, hydra.searchpath) go with the overrides to the extra workers
        user_dirs = [s.path for s in hydra_cfg.runtime.config_sources if s.schema == "file" and s.provider != "main"]
        code = pipeline.run(run_cfg, overrides + ([compose.searchpath_override(user_dirs)] if user_dirs else []))
        if code:
            sys.exit(code)  # a nightly job: 3 = new champion (0 = no change)


def _sweep_note(name) -> None:
    """One log line when the chosen sweep is the user's file in place of a shipped one of the same name."""
    from lora_search.config import compose

    path, shipped = compose.sweep_files().get(name), compose.sweeps_dir() / f"{name}.yaml"
    if path is not None and shipped.is_file() and path != shipped:
        log.info("sweep=%s: %s replaces the shipped sweep of that name", name, path)


def _task(cfg) -> None:
    try:
        run(cfg)
    except LoraSearchError as e:
        report(e)
        sys.exit(EXIT_USAGE)


def _command(name: str, args: list[str]) -> None:
    if name == "report":
        main([*args, "stage=report"])
    elif name == "dashboard":
        from lora_search.checks import overrides
        from lora_search.commands import dashboard

        dashboard.serve(overrides.compose(args))
    elif name == "preview":
        from lora_search.commands import preview

        print(preview.main(args))
    elif name == "storage-proxy":
        from lora_search.scale import storage_proxy

        storage_proxy.serve_proxy(args)
    elif name == "compare":
        from lora_search.report import compare

        print(compare.main(args))


def main(argv: list[str] | None = None) -> None:
    """Entry point: a command, or check the whole run before Hydra writes anything, then hand over to hydra.main."""
    import hydra

    from lora_search.checks import installed, overrides
    from lora_search.config import compose
    from lora_search.core import masking

    argv = sys.argv[1:] if argv is None else argv
    _quiet_libraries()
    try:  # first of all: a storage password leaves the command line (and sys.argv) before anything records it
        argv = masking.guard(argv)
    except LoraSearchError as e:
        report(e)
        sys.exit(EXIT_USAGE)
    if argv and argv[0] in COMMANDS:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        try:
            _command(argv[0], argv[1:])
        except LoraSearchError as e:
            report(e)
            sys.exit(EXIT_USAGE)
        return
    try:
        argv = overrides.launcher_jobs(argv)  # -m hydra/launcher=slurm sweep.workers=N: N jobs of one worker
        compose.check_overrides(overrides.overrides_of(argv), overrides.config_dirs(argv))
        if overrides.is_run(argv):
            cfg = overrides.compose(argv)
            installed.check_embedded_model(cfg)  # one line before the checks below load torch and the rest
            from lora_search.commands import preflight

            preflight.check(cfg)
    except LoraSearchError as e:
        report(e)
        sys.exit(EXIT_USAGE)
    compose.register()
    sys.argv = [sys.argv[0], *compose.hydra_overrides(argv)]
    hydra.main(config_path=str(compose.conf_dir()), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
