"""Scale: what each study storage costs per trial, and how many trials an hour 1, 2 and 4 workers finish here.

Two parts, written to results/bench/scale.json:

  storage   An Optuna study on each storage lora_search offers, opened through `lora_search.scale.storage.open_url(url)`
            (the storage a sweep really uses): SQLite (a file), Journal (a file), PostgreSQL (when
            $LORA_SEARCH_TEST_PG names one, or `.ci/postgres.sh` can start a local server; else recorded as skipped,
            with the reason) and the gRPC proxy (`python -m lora_search storage-proxy` in a subprocess, in front of
            PostgreSQL when there is one, else an SQLite file); an in-memory study beside them as the floor (the
            sampler and Optuna's own bookkeeping, no storage). The objective does nothing: ask, suggest 5 params
            (float log lr, int rank, float dropout, categorical targets, float alpha), report 3 intermediate values,
            tell. RandomSampler(seed=0) is the main figure (its cost does not grow with the trials, so growth is the
            storage's); TPE (seed 0) beside it, whose own cost grows with the trials. Per storage and sampler: ms per
            trial over all trials, over the first and the last 100, and the total seconds. A fresh study per
            measurement.
  workers   `python -m lora_search stage=search sweep=rank_lr sweep.workers=W ...` as a user runs it, no pruner (so
            trials are alike), on the tiny model and on the embedded default (SmolLM2-135M), W = 1 (SQLite), 2
            (Journal, and SQLite), 4 (Journal). Per run: the wall time from the command's start to the last finished
            trial, trials/hour over it (and over the time since the first trial started, without the start-up), the
            mean trial duration from the study, and whether the study ended at exactly n_trials finished trials.
            The workers split the machine's cores (launch.worker_env): with 2 cores, 4 workers are not faster, and
            the record says so as measured.

  .venv/bin/python benchmarks/scale.py           # 1,000 trials per storage; tiny 16 trials and embedded 8 trials
                                                 # of 10 steps for 1/2/4 workers -> results/bench/scale.json
  .venv/bin/python benchmarks/scale.py --quick   # 100 trials per storage; tiny only, 4 trials, 1 and 2 workers
                                                 # -> results/bench-quick/scale.json

Options: --trials (per storage), --tpe-trials (300, at most --trials; 0: no TPE measurement), --parts, --cache-dir,
--out.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402
from benchmarks._common import ROOT  # noqa: E402

log = logging.getLogger("scale")
NAME = "scale"
PG_ENV = "LORA_SEARCH_TEST_PG"
STORAGE_ENV = "LORA_SEARCH_STORAGE"  # lora_search.core.masking.STORAGE_ENV: kept out of the CLI runs' environment
# What .ci/postgres.sh creates; a server it started earlier is used as it is (the script drops and re-creates this
# database, which a test run may be using at that moment).
PG_SCRIPT_URL = "postgresql+psycopg://lora:lora@127.0.0.1:5432/lora_search_test"
PROXY_START_S = 120
# TPE's figure beside the random one: fewer trials in the full run. TPE reads the study's trials from the storage for
# each suggestion and fits on all of them, so its cost per trial grows with the study (quick run, 100 trials: 225 ms a
# trial on SQLite against 165 ms with the random sampler); 300 keeps the full run's time bounded.
TPE_TRIALS = 300

# The trial budget of each model's runs (sweep.trial replaces the sweep file's). The tiny model's trials are long
# enough (about 4 s on one thread) that the workers overlap: a worker's start-up (about 10 s) does not swamp them;
# the embedded model's are rank_lr's own (10 steps, about 20 s on 2 cores).
MODELS = {
    "tiny_llama": {
        "overrides": ["model=tiny_llama", "data.train_per_task=24", "data.eval_per_task=6"],
        "trial": {"trainer.max_steps": 48, "trainer.eval_every": 24, "trainer.eval_subset": 8,
                  "trainer.batch_size": 4, "trainer.exact_match_items": 0, "trainer.final_eval": "subset"},
    },
    "smollm2_135m": {  # the embedded default: no model= override
        "overrides": [],
        "trial": {"trainer.max_steps": 10, "trainer.eval_every": 5, "trainer.eval_subset": 32,
                  "trainer.exact_match_items": 0, "trainer.final_eval": "subset"},
    },
}
FULL_RUNS = [(1, "sqlite"), (2, "journal"), (2, "sqlite"), (4, "journal")]
QUICK_RUNS = [(1, "sqlite"), (2, "journal")]


# ---- part 1: the storage's cost per trial ----

def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connects(url: str, timeout_s: int = 3) -> bool:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": timeout_s})
        try:
            with engine.connect():
                return True
        finally:
            engine.dispose()
    except Exception:  # noqa: BLE001 - no server, no driver, wrong password: not usable here
        return False


def postgres() -> tuple[str | None, str, bool]:
    """(URL or None, where it came from or why there is none, whether this script started the server):
    $LORA_SEARCH_TEST_PG first, then a server .ci/postgres.sh started earlier, then .ci/postgres.sh itself."""
    env = os.environ.get(PG_ENV)
    if env:
        return (env, f"${PG_ENV}", False) if _connects(env) else (None, f"${PG_ENV} is set but does not connect", False)
    if _connects(PG_SCRIPT_URL):
        return PG_SCRIPT_URL, "the local server .ci/postgres.sh started earlier", False
    script = ROOT / ".ci" / "postgres.sh"
    if not script.exists():
        return None, f"${PG_ENV} is not set and there is no .ci/postgres.sh", False
    try:
        done = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None, f"${PG_ENV} is not set and .ci/postgres.sh did not finish within 600 s", False
    lines = done.stdout.strip().splitlines()
    url = lines[-1].strip() if lines else ""
    if done.returncode != 0 or not url.startswith("postgresql"):
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:200]
        return None, f"${PG_ENV} is not set and .ci/postgres.sh failed ({why})", False
    if not _connects(url):
        return None, f".ci/postgres.sh printed {url!r}, which does not connect", False
    return url, ".ci/postgres.sh (started by this benchmark, stopped at its end)", True


def stop_postgres() -> None:
    """Stop the cluster .ci/postgres.sh started (its newest PostgreSQL version, cluster main)."""
    versions = sorted((p.name for p in Path("/usr/lib/postgresql").glob("*")), key=lambda v: float(v))
    if versions:
        subprocess.run(["pg_ctlcluster", versions[-1], "main", "stop"], capture_output=True, timeout=120)


@contextlib.contextmanager
def grpc_proxy(backend_url: str, log_path: Path):
    """`python -m lora_search storage-proxy` in front of backend_url on a free port; yields its grpc:// URL once
    storage.open_url answers on it; terminated afterwards. The backend URL goes through $LORA_SEARCH_STORAGE (a
    password on a command line shows in `ps`)."""
    from lora_search.core.errors import ConfigError
    from lora_search.scale import storage

    port = free_port()
    url = f"grpc://127.0.0.1:{port}"
    env = {**os.environ, STORAGE_ENV: backend_url}
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lora_search", "storage-proxy", "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        t0, deadline = time.perf_counter(), time.monotonic() + PROXY_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the storage proxy exited {proc.returncode}: {log_path.read_text()[-1500:]}")
            try:
                storage.open_url(url).close()  # waits up to storage.CONNECT_TIMEOUT_S itself
                break
            except ConfigError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the storage proxy did not answer within {PROXY_START_S} s: "
                                       f"{log_path.read_text()[-1500:]}") from None
        log.info("gRPC storage proxy ready on port %d after %.1f s", port, time.perf_counter() - t0)
        yield url, time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _sampler(name: str):
    import optuna

    return optuna.samplers.RandomSampler(seed=0) if name == "random" else optuna.samplers.TPESampler(seed=0)


def no_op_loop(url: str | None, n: int, sampler: str) -> dict:
    """n trials of ask -> 5 suggestions -> 3 reports -> tell on a fresh study (url None: in memory); per-trial times."""
    import optuna

    from lora_search.scale import storage

    name = f"scale-{sampler}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    opened = storage.open_url(url) if url else None
    study = optuna.create_study(study_name=name, storage=opened, sampler=_sampler(sampler))
    open_s = time.perf_counter() - t0
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            trial = study.ask()
            lr = trial.suggest_float("trainer.learning_rate", 2e-4, 3e-3, log=True)
            r = trial.suggest_int("lora.r", 4, 64)
            dropout = trial.suggest_float("lora.dropout", 0.0, 0.1)
            targets = trial.suggest_categorical("lora.targets", ["qv", "attn", "all_linear"])
            alpha = trial.suggest_float("lora.alpha", 0.5, 4.0)
            value = lr * 100 + dropout + alpha / r + len(targets) / 10
            for step in (1, 2, 3):
                trial.report(value + 1.0 / step, step)
            study.tell(trial, value)
            times.append(time.perf_counter() - t)
    finally:
        if url and storage.kind(url) in ("rdb", "grpc"):  # a server database outlives the run: leave it clean
            with contextlib.suppress(Exception):
                optuna.delete_study(study_name=name, storage=opened)
        if hasattr(opened, "close"):  # the gRPC client's channel
            with contextlib.suppress(Exception):
                opened.close()
    return {
        "trials": n,
        "ms_per_trial": round(1000 * statistics.fmean(times), 3),
        "ms_per_trial_first_100": round(1000 * statistics.fmean(times[:100]), 3),
        "ms_per_trial_last_100": round(1000 * statistics.fmean(times[-100:]), 3),
        "ms_per_trial_median": round(1000 * statistics.median(times), 3),
        "ms_per_trial_by_100": [round(1000 * statistics.fmean(times[i:i + 100]), 2) for i in range(0, n, 100)],
        "total_s": round(sum(times), 3),
        "open_s": round(open_s, 3),
    }


def _measure(url, n: int, tpe_n: int) -> dict:
    """Both samplers' figures on one storage; url: a URL, None (in memory) or a function of the sampler's name
    giving a fresh file's URL per measurement."""
    out = {}
    for sampler, count in (("random", n), ("tpe", tpe_n)):
        if not count:
            continue
        log.info("  %s sampler, %d trials", sampler, count)
        try:
            out[sampler] = no_op_loop(url(sampler) if callable(url) else url, count, sampler)
            log.info("  %s: %.2f ms per trial (last 100: %.2f ms)", sampler, out[sampler]["ms_per_trial"],
                     out[sampler]["ms_per_trial_last_100"])
        except Exception as e:  # noqa: BLE001 - one storage failing must not lose the others' figures
            log.exception("%s on %s failed", sampler, url)
            out[sampler] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def storage_part(n: int, tpe_n: int, work: Path) -> dict:
    """Every storage's cost per trial: {storage: {url_kind, random: figures, tpe: figures} or {skipped: why}}."""
    import optuna

    from lora_search.core import masking

    results: dict = {}
    with common.quiet_optuna():
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # the experimental-feature warnings (gRPC, journal)
        log.info("storage: in memory (the floor: sampler and Optuna's bookkeeping)")
        results["in_memory"] = {"url": "(none: optuna.storages.InMemoryStorage)", **_measure(None, n, tpe_n)}
        files = {"sqlite": lambda sampler: f"sqlite:///{work / f'{sampler}.db'}",  # a fresh file per measurement
                 "journal": lambda sampler: f"journal://{work / f'{sampler}.journal'}"}
        for kind, url in files.items():
            log.info("storage: %s", kind)
            results[kind] = {"url": url("<sampler>").replace(str(work), "<tmp>"), **_measure(url, n, tpe_n)}

        pg_url, source, started = postgres()
        try:
            if pg_url:
                log.info("storage: postgresql (%s)", source)
                results["postgresql"] = {"url": masking.mask_url(pg_url), "source": source,
                                         **_measure(pg_url, n, tpe_n)}
            else:
                log.info("storage: postgresql skipped: %s", source)
                results["postgresql"] = {"skipped": source}
            behind = pg_url or f"sqlite:///{work / 'proxy.db'}"
            log.info("storage: gRPC proxy in front of %s", "postgresql" if pg_url else "sqlite")
            try:
                with grpc_proxy(behind, work / "proxy.log") as (url, ready_s):
                    results["grpc_proxy"] = {"url": "grpc://127.0.0.1:<free port>",
                                             "behind": "postgresql" if pg_url else "sqlite",
                                             "proxy_ready_s": round(ready_s, 1), **_measure(url, n, tpe_n)}
            except Exception as e:  # noqa: BLE001
                log.exception("the gRPC proxy failed")
                results["grpc_proxy"] = {"error": f"{type(e).__name__}: {e}"[:800]}
        finally:
            if started:
                stop_postgres()
    return results


# ---- part 2: trials per hour with 1, 2 and 4 workers ----

def _trial_override(trial: dict) -> str:
    return "++sweep.trial={" + ", ".join(f"{k}: {v}" for k, v in trial.items()) + "}"


def warm_cache(model: str, cache_dir: str | None) -> None:
    """The model's cached copy written before any timed run (the embedded GGUF's conversion happens once)."""
    from lora_search.config.compose import load_config
    from lora_search.models import loaders

    cfg = load_config([*MODELS[model]["overrides"], "tracking=none",
                       *([f"cache_dir={cache_dir}"] if cache_dir else [])])
    t0 = time.perf_counter()
    loaders.local_copy(cfg.model, cfg.cache_dir)
    log.info("%s cached (%.1f s)", model, time.perf_counter() - t0)


def _stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the command's process group (it and the workers it started: they record their running trials as
    interrupted), then SIGKILL to whatever of the group is still alive."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def cli_run(model: str, n: int, workers: int, store: str, work: Path, cache_dir: str | None,
            timeout_s: int) -> dict:
    """One `python -m lora_search stage=search ...` with `workers` workers on `store`; its figures from the study."""
    import optuna

    from lora_search.scale import storage

    name = f"scale_{model}_{workers}w_{store}_{uuid.uuid4().hex[:6]}"
    results_dir = work / name
    results_dir.mkdir(parents=True)
    url = (f"journal://{results_dir / 'study.journal'}" if store == "journal"
           else f"sqlite:///{(results_dir / name / 'study.db').resolve()}")  # lora_search's default place
    args = ["stage=search", "sweep=rank_lr", f"sweep.name={name}", f"sweep.n_trials={n}", f"sweep.workers={workers}",
            f"results_dir={results_dir}", "tracking=none", "sweep.pruner=none", *MODELS[model]["overrides"],
            _trial_override(MODELS[model]["trial"]), *([f"sweep.storage={url}"] if store == "journal" else []),
            *([f"cache_dir={cache_dir}"] if cache_dir else [])]
    env = {k: v for k, v in os.environ.items() if k != STORAGE_ENV}  # SQLite under results_dir, not the user's
    log_path = results_dir / "cli.log"
    log.info("== %s: %d workers on %s, n_trials=%d", model, workers, store, n)
    load = round(os.getloadavg()[0], 2)  # another process busy on the cores slows every figure here
    t0 = time.time()
    with open(log_path, "w") as out:  # its own process group: the workers it spawns are stopped with it
        proc = subprocess.Popen([sys.executable, "-m", "lora_search", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = f"timeout after {timeout_s} s"
        _stop_group(proc)
    except BaseException:  # Ctrl-C: no worker left behind
        _stop_group(proc)
        raise
    process_s = time.time() - t0
    row = {"workers": workers, "storage": store, "n_trials": n, "threads_per_worker": max(1, (os.cpu_count() or 1)
                                                                                          // workers),
           "command": "python -m lora_search " + " ".join(a for a in args if not a.startswith(("results_dir=",
                                                                                              "sweep.storage=",
                                                                                              "cache_dir="))),
           "exit_code": code, "process_s": round(process_s, 1), "load_average_at_start": load}
    if code != 0:
        row["error"] = f"exit {code}: {log_path.read_text()[-1500:]}"
    try:
        with common.quiet_optuna():
            study = optuna.load_study(study_name=name, storage=storage.open_url(url))
            trials = study.get_trials(deepcopy=False)
    except Exception as e:  # noqa: BLE001
        row.setdefault("error", f"{type(e).__name__}: {e}"[:500])
        return row
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in trials if t.state in done_states and t.datetime_complete]
    states = Counter(t.state.name.lower() for t in trials)
    row.update({
        "finished": len(finished),
        "exactly_n_trials": len(finished) == n,
        "states": dict(states),
        "not_needed": sum(1 for t in trials if t.user_attrs.get("status") == "not needed"),
        "trials_per_worker": sorted(Counter(str(t.user_attrs.get("worker", "?")) for t in finished).values(),
                                    reverse=True),
    })
    warned = [line.strip()[:300] for line in log_path.read_text().splitlines() if "exited with code" in line]
    if warned or len(row["trials_per_worker"]) < workers:  # a worker that ran no trial: too late, or it failed
        row["worker_warnings"] = warned
        row["worker_log_tails"] = {p.stem: p.read_text()[-400:] for p in
                                   sorted((results_dir / name / "workers").glob("worker*.log"))}
    if finished:
        last = max(t.datetime_complete.timestamp() for t in finished)
        first = min(t.datetime_start.timestamp() for t in trials if t.datetime_start)
        wall, busy = last - t0, last - first
        durations = [t.duration.total_seconds() for t in finished]
        row.update({
            "wall_to_last_trial_s": round(wall, 1),
            "start_to_first_trial_s": round(first - t0, 1),
            "trials_per_hour": round(len(finished) / (wall / 3600), 1),
            "trials_per_hour_after_first_start": round(len(finished) / (busy / 3600), 1) if busy > 0 else None,
            "trial_mean_s": round(statistics.fmean(durations), 2),
            "trial_median_s": round(statistics.median(durations), 2),
        })
        log.info("   %d finished (%s), %.0f s to the last one: %.0f trials/hour; trial mean %.1f s",
                 len(finished), "exactly n_trials" if len(finished) == n else f"n_trials={n}", wall,
                 row["trials_per_hour"], row["trial_mean_s"])
    return row


def workers_part(models: dict, runs: list, work: Path, cache_dir: str | None, timeout_s: int) -> dict:
    """{model: {n_trials, trial budget, runs: [one row per (workers, storage)]}}."""
    out = {}
    for model, n in models.items():
        try:
            warm_cache(model, cache_dir)
        except Exception as e:  # noqa: BLE001
            out[model] = {"error": f"caching the model failed: {type(e).__name__}: {e}"[:500]}
            continue
        rows = []
        for workers, store in runs:
            try:
                rows.append(cli_run(model, n, workers, store, work, cache_dir, timeout_s))
            except Exception as e:  # noqa: BLE001 - one run failing must not lose the others' figures
                log.exception("%s with %d workers on %s failed", model, workers, store)
                rows.append({"workers": workers, "storage": store, "n_trials": n,
                             "error": f"{type(e).__name__}: {e}"[:500]})
        out[model] = {"n_trials": n, "trial": MODELS[model]["trial"], "pruner": "none", "runs": rows}
    return out


# ---- the record ----

def run(quick: bool = False, trials: int | None = None, tpe_trials: int | None = None, parts=("storage", "workers"),
        cache_dir: str | None = None, out: Path | str | None = None) -> dict:
    """Measure both parts and write the record (results/bench/scale.json; results/bench-quick/scale.json quick)."""
    n = trials or (100 if quick else 1000)
    tpe_n = (n if quick else min(n, TPE_TRIALS)) if tpe_trials is None else tpe_trials
    models = {"tiny_llama": 4} if quick else {"tiny_llama": 16, "smollm2_135m": 8}
    runs = QUICK_RUNS if quick else FULL_RUNS
    timeout_s = 300 if quick else 1800
    figures: dict = {"quick": quick, "cores": os.cpu_count(), "load_average_before": [round(x, 2) for x in
                                                                                       os.getloadavg()]}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-search-scale-") as tmp:
        work = Path(tmp)
        if "storage" in parts:
            (work / "storage").mkdir()
            figures["storage"] = {"trials": n, "tpe_trials": tpe_n,
                                  "loop": "ask, 5 suggestions, 3 reports, tell; no training",
                                  "results": storage_part(n, tpe_n, work / "storage")}
        if "workers" in parts:
            (work / "workers").mkdir()
            figures["workers"] = {"runs_in_order": [f"{w} workers, {s}" for w, s in runs],
                                  "models": workers_part(models, runs, work / "workers", cache_dir, timeout_s)}
    figures["wall_s"] = round(time.perf_counter() - t0, 1)
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    rec = common.record(NAME, figures)
    path = common.write_record(rec, out or (ROOT / "results" / "bench-quick" / f"{NAME}.json" if quick else None))
    log.info("wrote %s (%.1f min)", path, figures["wall_s"] / 60)
    return rec


def summary(rec: dict) -> str:
    """A few lines for the terminal."""
    lines = []
    for kind, r in ((rec.get("storage") or {}).get("results") or {}).items():
        if "skipped" in r or "error" in r:
            lines.append(f"{kind}: {r.get('skipped') or r.get('error')}")
            continue
        lines.append(f"{kind}: " + "; ".join(
            f"{s} {common.fmt(r[s].get('ms_per_trial'), '.2f')} ms/trial (last 100 "
            f"{common.fmt(r[s].get('ms_per_trial_last_100'), '.2f')})" if "error" not in r[s] else f"{s} failed"
            for s in ("random", "tpe") if s in r))
    for model, m in ((rec.get("workers") or {}).get("models") or {}).items():
        for row in m.get("runs") or []:
            lines.append(f"{model} {row['workers']} workers ({row['storage']}): "
                         + (f"{common.fmt(row.get('trials_per_hour'), '.0f')} trials/h, {row.get('finished')}/"
                            f"{row['n_trials']} finished, trial mean {common.fmt(row.get('trial_mean_s'), '.1f')} s, "
                            f"{len(row.get('trials_per_worker') or [])} of {row['workers']} workers ran trials"
                            if row.get("finished") else row.get("error", "no trials")[:300]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Command line: --quick, --trials, --tpe-trials, --parts, --cache-dir, --out."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100 trials per storage; tiny model, 4 trials, 1 and 2 workers")
    p.add_argument("--trials", type=int, default=None, help="trials per storage measurement (1000; 100 with --quick)")
    p.add_argument("--tpe-trials", type=int, default=None,
                   help=f"trials of the TPE measurement ({TPE_TRIALS}, at most --trials; as --trials with --quick; "
                        "0: none)")
    p.add_argument("--parts", default="storage,workers", help="storage, workers or both (comma-separated)")
    p.add_argument("--cache-dir", default=None, help="the model cache (default: lora_search's)")
    p.add_argument("--out", default=None, help="the record (default results/bench/scale.json; "
                                               "results/bench-quick/scale.json with --quick)")
    a = p.parse_args(argv)
    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    if not parts or set(parts) - {"storage", "workers"}:
        p.error(f"--parts takes storage and/or workers, got {a.parts!r}")
    common.configure_logging()
    rec = run(a.quick, a.trials, a.tpe_trials, parts, a.cache_dir, a.out)
    print(summary(rec))
    return rec


if __name__ == "__main__":
    main()
