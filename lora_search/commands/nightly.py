"""A nightly tuning job (`sweep=nightly`): resume the persistent study, seed tonight's trials with the
best earlier configurations, search within a wall-clock budget, train tonight's best with the
promotion budget, and crown it champion only when it beats the current champion by the stated
margin, both measured tonight on tonight's data.

Writes results/<study>/nights/<night>/ (night.json, report.md, the candidate's full run) and
results/<study>/champion.json (the champion and every night's decision). The exit code tells a
scheduler what happened: 0 no change, 3 new champion, 1 failed, 2 bad configuration.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import sys
import time
from pathlib import Path

from optuna.trial import TrialState

from lora_search.config.schema import RunConfig
from lora_search.core import masking, records
from lora_search.core.errors import LoraSearchError
from lora_search.models import loaders
from lora_search.promote import benchmark
from lora_search.promote.benchmark import benchmark_stage
from lora_search.promote.merge import free_memory, load_full_precision, merge_stage
from lora_search.promote.promotion import load_best, promote_stage
from lora_search.report import study_report, wandb_summary
from lora_search.search.study import finished, open_study, search_stage, study_dir
from lora_search.train import tracking

log = logging.getLogger(__name__)
EXIT = {"no_change": 0, "new_champion": 3, "failed": 1}
SCORED = ("eval_loss", "perplexity", "exact_match", "rouge_l", "bleu")  # metrics re-measured on tonight's data


def night_label(cfg: RunConfig) -> str:
    """sweep.nightly.night, else today's date."""
    return cfg.sweep.nightly.night or datetime.date.today().isoformat()


def _with(cfg: RunConfig, **sweep) -> RunConfig:
    return dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, **sweep))


def tonight(study, night: str) -> list:
    """Tonight's finished trials."""
    return [t for t in finished(study) if t.user_attrs.get("night") == night]


def seed(study, cfg: RunConfig, night: str) -> list[int]:
    """Enqueue the best k configurations of earlier nights (once a night); return their trial numbers."""
    if any(t.user_attrs.get("night") == night for t in study.get_trials(deepcopy=False)):
        return []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    complete.sort(key=lambda t: t.value, reverse=cfg.sweep.direction == "maximize")
    seeds, seen = [], set()
    for t in complete:
        params = t.user_attrs.get("params") or t.params
        key = repr(sorted(params.items()))
        if key in seen:
            continue
        seen.add(key)
        study.enqueue_trial(params, user_attrs={"night": night, "seeded_from": t.number})
        seeds.append(t.number)
        if len(seeds) >= cfg.sweep.nightly.seed_top_k:
            break
    return seeds


def fingerprints(worker) -> dict:
    """What the night's numbers depend on: the data rows and the base model's weights."""
    return {"data": worker.data.fingerprint, "model": loaders.checksum(worker.base.model)}


def score(cfg: RunConfig, adapter_dir: Path, data) -> float | None:
    """The sweep metric of an adapter on tonight's eval data (full precision base + the adapter)."""
    from peft import PeftModel

    metric = cfg.sweep.metric
    if metric not in SCORED or not (Path(adapter_dir) / "adapter_config.json").exists():
        return None
    base = load_full_precision(cfg)
    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    model.eval()
    try:
        if metric in ("exact_match", "rouge_l", "bleu"):  # one generation pass scores all three
            return benchmark.exact_match(model, base.tokenizer, cfg, data).get(metric)
        return benchmark.eval_loss(model, base.tokenizer, cfg, data)[metric]
    finally:
        del model, base
        free_memory()


def better(candidate: float, champion: float, margin: float, maximize: bool) -> bool:
    """True when candidate beats champion by more than margin (a fraction of the champion's value)."""
    gap = abs(champion) * margin
    return candidate > champion + gap if maximize else candidate < champion - gap


def decide(cfg: RunConfig, champion: dict | None, candidate: float | None, champion_now: float | None,
           changed: list[str]) -> tuple[str, str]:
    """new_champion or no_change, and why."""
    margin, metric = cfg.sweep.nightly.margin, cfg.sweep.metric
    if candidate is None:
        return "no_change", "no complete trial tonight to promote"
    if champion is None:
        return "new_champion", "first champion of this study"
    if "model" in changed:
        return "new_champion", "the base model changed since the champion was trained: its adapter no longer applies"
    if champion_now is None:
        return "new_champion", "the champion could not be re-measured on tonight's data"
    maximize = cfg.sweep.direction == "maximize"
    verdict = f"{metric} {candidate:.4f} vs champion {champion_now:.4f} (margin {margin:.1%})"
    if better(candidate, champion_now, margin, maximize):
        return "new_champion", f"beat the champion: {verdict}"
    return "no_change", f"did not beat the champion by the margin: {verdict}"


def run_night(cfg: RunConfig, get_worker, overrides: list[str] = ()) -> int:
    """Run one night; return the exit code (0 no change, 3 new champion, 1 a user error recorded as the night's
    failure; any other failure is recorded, then raised)."""
    night = night_label(cfg)
    cfg = _with(cfg, nightly=dataclasses.replace(cfg.sweep.nightly, night=night))
    out = study_dir(cfg)
    night_dir = out / "nights" / night
    done = records.read_json(night_dir / "night.json")
    if done and done.get("decision") in ("no_change", "new_champion"):
        log.info("night %s already ran (%s): nothing to do", night, done["decision"])
        return EXIT[done["decision"]]
    t0 = time.perf_counter()
    entry = {"night": night, "study": cfg.sweep.name, "metric": cfg.sweep.metric, "direction": cfg.sweep.direction,
             "started": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        entry.update(_night(cfg, get_worker, overrides, night, night_dir))
    except BaseException as e:
        entry.update(decision="failed", reason=f"{type(e).__name__}: {e}", wall_s=time.perf_counter() - t0)
        _close(cfg, night_dir, entry, None)
        if not isinstance(e, LoraSearchError):
            raise
        # A user-fixable error once the night had started (the config passed its checks): a recorded failure,
        # exit 1 like any failed night, not 2 (bad configuration, nothing ran); one line, no traceback.
        print(masking.mask(f"error: night {night} failed: {e} (recorded in {night_dir / 'night.json'})"),
              file=sys.stderr)
        return EXIT["failed"]
    entry["wall_s"] = time.perf_counter() - t0
    _close(cfg, night_dir, entry, entry.pop("_champion", None))
    return EXIT[entry["decision"]]


def _night(cfg: RunConfig, get_worker, overrides, night: str, night_dir: Path) -> dict:
    out = study_dir(cfg)
    study = open_study(cfg)
    seeds = seed(study, cfg, night)
    ran = len(tonight(study, night))
    target = len(finished(study)) - ran + cfg.sweep.nightly.trials_per_night
    log.info("night %s: %d trials to run (%d seeded from earlier nights: %s)", night,
             max(cfg.sweep.nightly.trials_per_night - ran, 0), len(seeds), seeds)
    study = search_stage(_with(cfg, n_trials=target), get_worker, overrides)
    prints = fingerprints(get_worker())  # the composed base and tonight's data (no reference kept: promotion may
    data = get_worker().data              # load the best trial's own base in its place)
    champion = records.read_json(out / "champion.json") or {}
    current = champion.get("champion")
    changed = [k for k, v in prints.items() if current and current.get("fingerprints", {}).get(k) != v]
    trials = tonight(study, night)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    maximize = cfg.sweep.direction == "maximize"
    best = (max if maximize else min)(complete, key=lambda t: t.value) if complete else None
    entry = {"trials": len(trials), "pruned": sum(t.state == TrialState.PRUNED for t in trials),
             "failed": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
             "seeded_from": seeds, "fingerprints": prints, "changed": changed,
             "champion_value_before": current.get("value") if current else None}
    if best is None:
        decision, reason = decide(cfg, current, None, None, changed)
        return {**entry, "decision": decision, "reason": reason, "candidate_value": None,
                "champion_value_after": entry["champion_value_before"]}
    entry.update(best_trial=best.number, best_value=best.value, best_params=best.user_attrs.get("params") or best.params)
    promote_stage(cfg, study, get_worker, out=night_dir, best=best, pool=complete)
    full_cfg = load_best(night_dir)
    full = records.read_json(night_dir / "full" / "metrics.json")
    if full.get("full_mean") is not None:  # sweep.promotion.seeds > 1: the mean of its full runs on tonight's data
        candidate = full["full_mean"]
        entry["candidate_seeds"] = full.get("full_values")
    else:
        candidate = score(full_cfg, night_dir / "full" / "adapter", data)
        candidate = full.get("full_value") if candidate is None else candidate
    promoted = records.read_json(night_dir / "best.json") or {}
    if promoted.get("trial") not in (None, best.number):  # top_k: a runner-up's full run beat the best trial's
        entry.update(promoted_trial=promoted["trial"], best_params=promoted.get("params") or entry["best_params"])
    champion_now = None
    if current and "model" not in changed:
        champion_now = score(full_cfg, Path(current["adapter"]), data)
        champion_now = current.get("value") if champion_now is None and not changed else champion_now
    decision, reason = decide(cfg, current or None, candidate, champion_now, changed)
    entry.update(candidate_value=candidate, champion_value_now=champion_now, decision=decision, reason=reason)
    log.info("night %s: %s (%s)", night, decision.replace("_", " "), reason)
    if decision == "new_champion":
        _crown(full_cfg, night_dir, data)
        entry["champion_value_after"] = candidate
        entry["_champion"] = {"night": night, "trial": entry.get("promoted_trial", best.number), "value": candidate,
                              "metric": cfg.sweep.metric,
                              "params": entry["best_params"], "fingerprints": prints,
                              "adapter": str((night_dir / "full" / "adapter").resolve()),
                              "merged": str((night_dir / "full" / "merged").resolve())}
    else:
        entry["champion_value_after"] = champion_now if champion_now is not None else entry["champion_value_before"]
    return entry


def _crown(full_cfg: RunConfig, night_dir: Path, data) -> None:
    """Merge and benchmark a new champion (only champions pay for it)."""
    merge_stage(full_cfg, night_dir, data)
    bench = benchmark_stage(full_cfg, night_dir, data)
    tracking.log_benchmark(full_cfg, study_dir(full_cfg), bench)


def _close(cfg: RunConfig, night_dir: Path, entry: dict, new_champion: dict | None) -> None:
    """Write night.json, update champion.json (champion and history) and the dated report."""
    out = study_dir(cfg)
    records.write_json(night_dir / "night.json", entry)
    champion = records.read_json(out / "champion.json") or {"champion": None, "history": []}
    if new_champion:
        champion["champion"] = new_champion
    history = [h for h in champion["history"] if h.get("night") != entry["night"]]
    keep = ("night", "decision", "reason", "best_trial", "best_value", "candidate_value", "champion_value_before",
            "champion_value_now", "champion_value_after", "changed", "fingerprints", "trials", "pruned", "wall_s")
    champion["history"] = [*history, {k: entry.get(k) for k in keep}]
    records.write_json(out / "champion.json", champion)
    try:
        write_night_report(cfg, night_dir, entry, champion)
        if entry["decision"] != "failed":
            wandb_summary.log_study(open_study(cfg), cfg, out, night_dir)
    except Exception as e:  # noqa: BLE001 - a report problem must not hide the night's outcome
        log.warning("could not write the night's report: %s", e)


def night_sections(entry: dict, champion: dict) -> list[str]:
    """Markdown for the top of a night's report: the decision, what changed, the champion's history."""
    metric = entry.get("metric")
    lines = [f"**Decision: {entry['decision'].replace('_', ' ')}**: {entry.get('reason', '')}", "",
             "## What changed", ""]
    changed = entry.get("changed") or []
    if changed:
        lines += [f"- The {' and the '.join('data' if c == 'data' else 'base model' for c in changed)} changed "
                  "since the champion was trained (fingerprints below); both were measured again on tonight's data."]
    else:
        lines += ["- Data and base model are the same as the champion's (fingerprints match)."]
    if entry.get("seeded_from"):
        lines += [f"- Seeded with earlier trials {', '.join(f'#{n}' for n in entry['seeded_from'])}."]
    if entry.get("trials") is not None:
        lines += [f"- {entry['trials']} trials tonight ({entry.get('pruned', 0)} pruned); best #{entry.get('best_trial')} "
                  f"with {metric} {_num(entry.get('best_value'))} in its short run."]
    lines += [f"- Full run of tonight's best: {metric} {_num(entry.get('candidate_value'))}; champion before "
              f"{_num(entry.get('champion_value_now', entry.get('champion_value_before')))} (re-measured tonight), "
              f"after {_num(entry.get('champion_value_after'))}."]
    lines += [f"- {key} fingerprint: `{value[:16]}`" for key, value in (entry.get("fingerprints") or {}).items()]
    lines += ["", "## Champion history", ""]
    rows = [[h["night"], h["decision"], h.get("candidate_value"), h.get("champion_value_after"),
             ", ".join(h.get("changed") or []), h.get("reason")] for h in champion["history"]]
    lines += [study_report.table(["night", "decision", f"candidate {metric}", f"champion {metric}", "changed", "why"], rows)]
    if champion.get("champion"):
        c = champion["champion"]
        lines += ["", f"Champion: night {c['night']}, trial #{c['trial']}, {metric} {_num(c['value'])}; "
                      f"adapter `{c['adapter']}`."]
    return [*lines, ""]


def write_night_report(cfg: RunConfig, night_dir: Path, entry: dict, champion: dict) -> Path:
    """nights/<night>/report.md (+ report.html, plots/): tonight's sections, then the study's report."""
    title = f"Night {entry['night']}: study `{entry['study']}`"
    preface = night_sections(entry, champion)
    try:
        return study_report.write_report(open_study(cfg), cfg, night_dir, title=title, preface=preface)
    except Exception as e:  # noqa: BLE001 - the storage may be what failed tonight
        log.warning("study report unavailable tonight (%s): writing the night's sections only", e)
        path = night_dir / "report.md"
        records.write_text(path, "\n".join([f"# {title}", "", *preface]))
        return path


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
