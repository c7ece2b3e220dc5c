"""`compare`: studies side by side (best metric, params, cost), or one nightly study night by night.

A study is a folder holding sweep.yaml (the resolved config the pipeline wrote); its trials are read
from the study's storage, never written. A missing record leaves a blank cell, never an error.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from lora_search.core import masking, records
from lora_search.core.errors import ConfigError
from lora_search.report.tables import table

log = logging.getLogger(__name__)
STUDY_HEADER = ["study", "model", "data", "metric", "best", "best params", "complete", "pruned", "failed",
                "cost (min)", "full run", "tuned exact match"]
STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
NIGHT_HEADER = ["night", "trials", "pruned", "failed", "best that night", "decision", "champion after",
                "changed", "wall (min)", "reason"]


def studies(results_dir: Path) -> list[str]:
    """The study folders under results_dir (those holding a sweep.yaml), by name."""
    return sorted(p.parent.name for p in Path(results_dir).glob("*/sweep.yaml"))


def find(arg: str, results_dir: Path) -> Path:
    """A study folder from a name under results_dir or a path; ConfigError naming the studies there."""
    for folder in (Path(results_dir) / arg, Path(arg)):
        if folder.is_dir() and ((folder / "sweep.yaml").exists() or (folder / "nights").is_dir()):
            return folder
    known = studies(results_dir)
    close = difflib.get_close_matches(arg, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    listing = ", ".join(known) if known else "none"
    raise ConfigError(f"unknown study '{arg}': no {Path(results_dir) / arg}/sweep.yaml and no such study folder; "
                      f"{hint}studies under {results_dir}: {listing}")


def sweep_config(folder: Path) -> dict:
    """The study's resolved config (sweep.yaml) as plain data; {} when missing or unreadable."""
    try:
        return OmegaConf.to_container(OmegaConf.load(folder / "sweep.yaml"), resolve=True)
    except Exception as e:  # a broken record shows as blank cells
        log.info("%s: no readable sweep.yaml (%s)", folder, e)
        return {}


def load(folder: Path, sweep: dict) -> optuna.Study | None:
    """The study from its storage, opened read-only where it is a SQLite file; None when absent."""
    storage = sweep.get("storage")
    if not storage:
        db = (folder / "study.db").resolve()
        if not db.exists():
            return None
        storage = f"sqlite:///file:{db}?mode=ro&uri=true"
    # sweep.yaml keeps URLs with the password masked: the real one is $LORA_SEARCH_STORAGE when it masks to
    # the same, else connect without it, so the driver takes PGPASSWORD or ~/.pgpass instead.
    env = os.environ.get(masking.STORAGE_ENV)
    storage = env if env and masking.mask_url(env) == storage else storage.replace(":***@", "@")
    try:
        return optuna.load_study(study_name=sweep.get("name") or folder.name, storage=storage)
    except Exception as e:
        log.info("%s: cannot load the study from its storage (%s)", folder, e)
        return None


def _read(path: Path) -> dict:
    try:
        return records.read_json(path) or {}
    except (OSError, ValueError) as e:
        log.info("%s unreadable: %s", path, e)
        return {}


def _short(params: dict) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in sorted(params.items()))


def study_row(folder: Path) -> tuple[list, dict]:
    """One table row for a study folder, and the facts the best-study line needs."""
    cfg = sweep_config(folder)
    sweep, full = cfg.get("sweep") or {}, _read(folder / "full" / "metrics.json")
    metric, direction = sweep.get("metric"), sweep.get("direction")
    study = load(folder, sweep)
    trials = study.get_trials(deepcopy=False) if study else []
    states = [t.state for t in trials]
    best = None
    if optuna.trial.TrialState.COMPLETE in states and len(study.directions) == 1:  # several objectives: no one best
        try:
            best = study.best_trial
        except ValueError:  # every complete trial over the memory budget
            best = None
    spent = [t.duration.total_seconds() for t in trials if t.duration is not None]
    if isinstance(full.get("wall_s"), (int, float)):
        spent.append(full["wall_s"])
    bench = _read(folder / "benchmark.json")
    name = sweep.get("name") or folder.name
    counts = [states.count(s) if study else None for s in STATES]
    row = [name, (cfg.get("model") or {}).get("name"), (cfg.get("data") or {}).get("name"),
           f"{metric} ({direction[:3]})" if metric and direction else metric,
           best.value if best else None, _short(best.params) if best else None, *counts,
           round(sum(spent) / 60, 1) if spent else None, full.get("full_value"),
           (bench.get("tuned") or {}).get("exact_match")]
    return row, {"name": name, "metric": metric, "direction": direction, "best": best.value if best else None}


def best_lines(facts: list[dict]) -> list[str]:
    """For each (metric, direction) that two or more studies share, the study with the best value."""
    groups: dict[tuple, list[dict]] = {}
    for f in facts:
        if f["metric"] and f["direction"] in ("minimize", "maximize") and f["best"] is not None:
            groups.setdefault((f["metric"], f["direction"]), []).append(f)
    lines = []
    for (metric, direction), group in groups.items():
        if len(group) < 2:
            continue
        pick = (min if direction == "minimize" else max)(group, key=lambda f: f["best"])
        lines.append(f"Best {metric} ({direction}): {pick['name']} ({pick['best']:.4g}), of "
                     f"{', '.join(f['name'] for f in group)}.")
    return lines


def nights(folder: Path) -> list[dict]:
    """The nightly records of a study folder, oldest first (an unreadable one keeps only its name)."""
    out = []
    for path in sorted(Path(folder).glob("nights/*/night.json")):
        try:
            out.append({"night": path.parent.name, **json.loads(path.read_text())})
        except (OSError, ValueError) as e:
            out.append({"night": path.parent.name, "reason": f"unreadable night.json: {e}"})
    return out


def night_table(folder: Path) -> str:
    """One row per night of a nightly study, and the champion at the end."""
    records_ = nights(folder)
    rows = [[n.get("night"), n.get("trials"), n.get("pruned"), n.get("failed"), n.get("best_value"),
             n.get("decision"), n.get("champion_value_after"), ", ".join(n.get("changed") or []) or None,
             round(n["wall_s"] / 60, 1) if isinstance(n.get("wall_s"), (int, float)) else None, n.get("reason")]
            for n in records_]
    first = next((n for n in records_ if n.get("metric")), {})
    about = f", {first['metric']} ({first.get('direction')})" if first else ""
    lines = [f"Study {first.get('study') or folder.name}: {len(rows)} nights{about}.", "", table(NIGHT_HEADER, rows)]
    crowned = [n for n in records_ if n.get("decision") == "new_champion"]
    if crowned:
        lines += ["", f"Champion: {crowned[-1].get('champion_value_after')} since night {crowned[-1]['night']}."]
    return "\n".join(lines)


def main(args: list[str]) -> str:
    """`compare [STUDY|PATH ...] [results_dir=PATH]`: the comparison table as markdown."""
    results_dir = Path("results")
    names = []
    for arg in args:
        if arg.startswith("results_dir="):
            results_dir = Path(arg.split("=", 1)[1])
        else:
            names.append(arg)
    folders = [find(n, results_dir) for n in names] if names else [results_dir / n for n in studies(results_dir)]
    if not folders:
        raise ConfigError(f"no studies under {results_dir} (folders holding a sweep.yaml) to compare")
    if len(folders) == 1 and nights(folders[0]):
        return night_table(folders[0])
    rows, facts = zip(*(study_row(f) for f in folders))
    return "\n".join([table(STUDY_HEADER, list(rows)), "", *best_lines(list(facts))]).rstrip()
