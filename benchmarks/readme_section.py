"""Print the "Measurements" section of docs/performance.md (markdown) from the records in results/bench/*.json.

  .venv/bin/python benchmarks/readme_section.py                 # from results/bench/
  .venv/bin/python benchmarks/readme_section.py --dir <folder>  # from other records
  .venv/bin/python benchmarks/readme_section.py --update docs/performance.md   # replace the section between its markers
  .venv/bin/python benchmarks/readme_section.py --check docs/performance.md    # exit 1 if the section differs

Each record gets a short heading, its figures (a table or a line) and the machine it ran on. A missing
folder, a missing or unreadable file, or a record of a kind this script does not know is never an error:
unknown records are shown as a table of their top-level figures, missing ones are simply absent.
(The name is historical: the section lived in the README until the docs were split by topic.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

TITLES = {
    "load_time": "Model load time",
    "peer_sweep": "LoRA search against its peers",
    "overhead": "Per-trial overhead",
    "throughput": "Training throughput",
    "pruning": "The same sweep with and without pruning",
    "dpo_sweep": "Preference tuning end to end (`sweep=dpo_beta`)",
    "pareto_sweep": "Quality and cost together (`sweep=rank_lr_pareto`)",
    "memory_estimate": "The memory estimator against measured peaks",
    "scale": "Scale: workers and study storages",
    "search_quality": "Search quality against a ground-truth grid",
}
LABELS = {"handwritten": "hand-written Optuna + TRL recipe", "lora_search": "lora_search",
          "hf_search": "transformers `hyperparameter_search`"}


def _num(value, pattern: str = ".1f", missing: str = "-") -> str:
    return common.fmt(value, pattern, missing)


def render_load_time(rec: dict) -> list[str]:
    """The embedded model's GGUF conversion against the cached safetensors load."""
    loads = rec.get("cached_load_s") or []
    return [f"{rec.get('model', 'model')}: first use (GGUF conversion) {_num(rec.get('gguf_convert_s'))} s; "
            f"cached safetensors load {_num(rec.get('cached_load_median_s'), '.2f')} s (median of {len(loads)}), "
            f"{_num(rec.get('speedup'))}x faster."]


def _met(flag) -> str:
    return "met" if flag is True else "not met" if flag is False else "not measured"


def render_peer_sweep(rec: dict) -> list[str]:
    """Three ways to run the same search: wall time, per-trial breakdown, pruning, best losses."""
    s = rec.get("settings") or {}
    approaches = rec.get("approaches") or {}
    hand_wall = (approaches.get("handwritten") or {}).get("wall_s")
    lines = [
        f"{s.get('model', rec.get('model', '?'))}, {s.get('trials', '?')} trials of {s.get('max_steps', '?')} steps "
        f"(eval every {s.get('eval_every', '?')}), batch {s.get('batch_size', '?')}, "
        f"TPE seed {(s.get('sampler') or {}).get('seed', '?')}; {s.get('train_rows', '?')} train / "
        f"{s.get('eval_rows', '?')} eval rows; run in the order {', '.join(rec.get('order') or [])}"
        + (" (quick settings: not representative)" if s.get("quick") else "") + ".",
        "",
        "| approach | wall (s) | vs hand-written | per trial: set-up / steps / evals (s) "
        "| complete / pruned | own best (evaluated on) | best config, full-eval loss | precision |",
        "| --- | ---: | ---: | --- | --- | --- | ---: | --- |",
    ]
    for name, a in approaches.items():
        label = LABELS.get(name, name)
        if "error" in a:
            lines.append(f"| {label} | failed: {a['error'][:80]} | | | | | | |")
            continue
        m = a.get("trial_means_s") or {}
        ratio = f"{a['wall_s'] / hand_wall:.2f}x" if hand_wall and a.get("wall_s") else "-"
        lines.append(
            f"| {label} | {_num(a.get('wall_s'))} | {ratio} | {_num(m.get('setup_s'))} / {_num(m.get('train_step_s'))} "
            f"/ {_num(m.get('eval_s'))} | {a.get('complete', '?')} / {a.get('pruned', '?')} "
            f"| {_num(a.get('best_value'), '.4f')} ({a.get('objective_on', '?')}) "
            f"| {_num(a.get('best_full_eval_loss'), '.4f')} | {a.get('precision', '?')} |")
    t = rec.get("targets") or {}
    gap = _num(t.get("lora_search_best_loss_vs_handwritten_pct"), "+.1f")
    lines += ["", f"Targets: lora_search's wall time {_num(t.get('lora_search_wall_vs_handwritten'), '.3f')}x the "
                  f"hand-written recipe's (target <= {t.get('wall_target_ratio', 0.5)}x: {_met(t.get('wall_met'))}); "
                  f"its best configuration's full-eval loss {gap}% against the recipe's "
                  f"(target within {t.get('loss_target_pct', 2.0)}%: {_met(t.get('loss_met'))})."]
    return lines


def render_overhead(rec: dict) -> list[str]:
    """Time to the first optimizer step, the share outside steps and pruning evals, memory across trials."""
    first, share, t = rec.get("to_first_step_s") or {}, rec.get("outside_share") or {}, rec.get("targets") or {}
    held = rec.get("memory_mb_after_trial") or []
    leaks = rec.get("live_objects_between_trials") or []
    clean = all((e.get("peft_models"), e.get("lora_layers"), e.get("optimizers")) == (0, 0, 0) for e in leaks)
    return [
        f"{rec.get('model', '?')}, {rec.get('trials', '?')} trials of {rec.get('max_steps', '?')} steps in one worker, "
        f"W&B {rec.get('tracking', '?')}, no pruner.",
        "",
        f"- Trial start to first optimizer step: {_num(first.get('median_later'), '.2f')} s (median; max "
        f"{_num(first.get('max_later'), '.2f')} s); the first trial {_num(first.get('first_trial'), '.2f')} s"
        + (" (the worker tokenizes the data before it)." if rec.get("tokenized_before_first_trial")
           else " (it tokenizes the data once for all)."),
        f"- Share of a trial's wall time outside optimizer steps and the pruning evals: median "
        f"{_num(share.get('median'), '.1%')}, max {_num(share.get('max'), '.1%')} "
        f"(target <= {t.get('outside_share', 0.1):.0%}: {_met(t.get('outside_share_met'))}).",
        f"- Worker memory after trial 1 {_num(held[0] if held else None)} MB, after trial {len(held)} "
        f"{_num(held[-1] if held else None)} MB: {_num(rec.get('memory_growth'), '+.2%')} (target <= "
        f"{t.get('memory_growth', 0.01):.0%}: {_met(t.get('memory_growth_met'))}); "
        + ("no PeftModel, LoRA layer or optimizer alive between trials." if leaks and clean
           else "objects left alive between trials: see the record."),
        f"  Memory is {rec.get('memory_measure', 'as recorded')}; the process RSS went from "
        f"{_num(leaks[0].get('rss_mb') if leaks else None)} to {_num(leaks[-1].get('rss_mb') if leaks else None)} MB "
        "over the same trials.",
    ]


def _pruner(spec) -> str:
    spec = {"type": spec} if isinstance(spec, str) else dict(spec or {"type": "?"})
    kwargs = ", ".join(f"{k} {v}" for k, v in spec.items() if k != "type")
    return f"{spec.get('type')}" + (f" ({kwargs})" if kwargs else "")


def render_pruning(rec: dict) -> list[str]:
    """The same sweep with and without pruning: compute, steps, trial states and the best value per seed."""
    s, f, t = rec.get("settings") or {}, rec.get("figures") or {}, rec.get("targets") or {}
    metric = s.get("metric", "value")
    reported = sorted({step for a in ((rec.get("arms") or {}).get("pruned") or {}).get("runs") or []
                       for t in a.get("trials") or [] for step, _ in t.get("intermediate") or []})
    cadence = (f"at steps {', '.join(str(x) for x in reported)}" if reported
               else f"every {s.get('eval_every', '?')} steps")
    lines = [
        f"{s.get('model', rec.get('model', '?'))}, {s.get('trials', '?')} trials of {s.get('max_steps', '?')} steps "
        f"per sweep, TPE seeds {', '.join(str(x) for x in s.get('seeds') or []) or '?'}; pruned: "
        f"{_pruner(s.get('pruner'))} on an eval of {s.get('eval_subset', '?')} rows {cadence}; "
        "unpruned: no pruner and one eval of the same rows after the last step"
        + (" (quick settings: not representative)" if s.get("quick") else "") + ".",
        "",
        f"| arm | seed | compute (s) | optimizer steps | complete / pruned | best {metric} |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for arm, a in (rec.get("arms") or {}).items():
        for run in a.get("runs") or []:
            if "error" in run:
                lines.append(f"| {arm} | {run.get('seed', '?')} | failed: {str(run['error'])[:80]} | | | |")
                continue
            lines.append(f"| {arm} | {run.get('seed', '?')} | {_num(run.get('compute_s'))} | {run.get('steps', '-')} "
                         f"| {run.get('complete', '?')} / {run.get('pruned', '?')} "
                         f"| {_num(run.get('best_value'), '.4f')} |")
    ratio = t.get("compute_ratio", 0.4)
    bests = f.get("best_values") or {}
    spread = (f"run-to-run spread {_num(f['unpruned_best_spread'], '.4f')}" if f.get("unpruned_best_spread")
              is not None else "one seed: no run-to-run spread measured")
    if "best_gap_mean" in f:
        rule = (f"mean gap {_num(f['best_gap_mean'], '+.4f')} (positive: pruned worse); target, the gap within the "
                f"spread: {_met(t.get('best_met'))}; the stricter check, every pruned best no worse than the worst "
                f"unpruned one: {_met(f.get('every_pruned_best_no_worse_than_worst_unpruned'))}")
    else:  # a record from before the mean-gap rule
        worst = "highest" if s.get("direction", "minimize") == "minimize" else "lowest"
        rule = f"target, every pruned best no worse than the {worst} unpruned one: {_met(t.get('best_met'))}"
    lines += ["", f"Compute: the pruned sweeps used {_num(f.get('compute_ratio'), '.2f')}x the unpruned sweeps' "
                  f"trial time ({_num(f.get('step_ratio'), '.2f')}x their optimizer steps; target <= {ratio:.2f}x: "
                  f"{_met(t.get('compute_met'))}).",
              f"Best {metric}: pruned {', '.join(_num(b, '.4f') for b in bests.get('pruned') or []) or '-'}, "
              f"unpruned {', '.join(_num(b, '.4f') for b in bests.get('unpruned') or []) or '-'} ({spread}); "
              f"{rule}."]
    return lines


def _flat(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in data.items():
        if key in ("provenance", "name") or key.startswith("_"):
            continue
        if isinstance(value, dict) and not prefix:
            out.extend(_flat(value, f"{key}."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out.append((prefix + key, value))
        elif isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value) and len(value) <= 8:
            out.append((prefix + key, ", ".join(str(v) for v in value)))
    return out


def render_dpo_sweep(rec: dict) -> list[str]:
    """The DPO sweep: held-out preference accuracy of base and tuned, and the wall time, against the targets."""
    best = ", ".join(f"{k.split('.')[-1]}={common.fmt(v, '.3g')}" for k, v in (rec.get("best_params") or {}).items())
    return [f"`{rec.get('command', 'sweep=dpo_beta').strip()}`: held-out preference accuracy "
            f"{_num(100 * rec['base_preference_accuracy'], '.0f')}% (base) -> "
            f"{_num(100 * rec['tuned_preference_accuracy'], '.0f')}% (tuned) on {rec.get('held_out_pairs')} pairs, "
            f"{_num(rec.get('lift_points'), '+.0f')} points (target +{_num(rec.get('target_points'), '.0f')}: "
            f"{_met(rec.get('lift_met'))}); {_num(rec.get('wall_s', 0) / 60)} min end to end (target "
            f"{_num(rec.get('target_s', 0) / 60, '.0f')} min: {_met(rec.get('within_time'))}); trials: "
            + ", ".join(f"{n} {state}" for state, n in (rec.get("trials") or {}).items())
            + f"; best {best}."]


def render_pareto_sweep(rec: dict) -> list[str]:
    """The two-objective sweep: its front, the rule's choice against the lowest loss, the time and the lift."""
    chosen, lowest = rec.get("chosen") or {}, rec.get("lowest_loss") or {}
    em = [rec.get("base_exact_match"), rec.get("tuned_exact_match")]
    lift = f"exact match {_num(100 * em[0], '.1f')}% -> {_num(100 * em[1], '.1f')}%; " if None not in em else ""
    return [f"`{rec.get('command', 'sweep=rank_lr_pareto').strip()}`: objectives {', '.join(rec.get('objectives', []))}; "
            f"trials: " + ", ".join(f"{n} {state}" for state, n in (rec.get("trials") or {}).items())
            + f"; Pareto front {', '.join('#' + str(c['trial']) for c in rec.get('front') or [])}. The rule "
            f"({rec.get('rule')}) chose #{chosen.get('trial')}" + (
                ", the lowest-loss trial itself (no other front trial was within the band). " if chosen.get("trial") ==
                lowest.get("trial") else f": {_num(rec.get('params_saved_x'))}x fewer trainable parameters than the "
                f"lowest-loss #{lowest.get('trial')} for {_num(rec.get('loss_given_up_pct'), '+.1f')}% eval loss. ")
            + f"{lift}{_num(rec.get('wall_s', 0) / 60)} min end to end (target "
            f"{_num(rec.get('target_s', 0) / 60, '.0f')} min: {_met(rec.get('within_time'))}); memory estimate vs "
            f"measured peak, worst trial: {_num(100 * (rec.get('memory_estimate_max_error') or 0), '.0f')}% off."]


def render_memory_estimate(rec: dict) -> list[str]:
    """memory.estimate against the measured peak of fresh runs: the error per configuration and in summary."""
    lines = []
    for device in ("cpu", "cuda"):
        part = rec.get(device) or {}
        if part.get("skipped"):
            lines += [f"{device.upper()}: {part['skipped']}.", ""]
            continue
        s = part.get("summary") or {}
        lines += [f"{device.upper()}: {s.get('measured')} configurations ({(rec.get('settings') or {}).get('model')}, "
                  f"each in a fresh process): median |error| {_num(100 * (s.get('median_abs_rel_error') or 0))}%, "
                  f"max {_num(100 * (s.get('max_abs_rel_error') or 0))}%, {s.get('within_goal')} within "
                  f"{_num(100 * (s.get('goal') or 0), '.0f')}% (goal {_met(s.get('met'))}).", "",
                  "| configuration | measured MB | estimate MB | error |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['label']} | {_num(r.get('measured_mb'), '.0f')} | {_num(r.get('estimate_mb'), '.0f')} | "
                  f"{_num(100 * r['rel_error'], '+.1f') if r.get('rel_error') is not None else '-'}% |"
                  for r in part.get("rows") or []]
        lines.append("")
    return lines[:-1] if lines and lines[-1] == "" else lines


def render_generic(rec: dict) -> list[str]:
    """A record of a kind not known here: its top-level figures as a table."""
    rows = _flat(rec)[:30]
    if not rows:
        return ["(no figures)"]
    return ["| figure | value |", "| --- | --- |"] + [f"| {k} | {_num(v, '.4g', str(v))} |" for k, v in rows]


def render_throughput(rec: dict) -> list[str]:
    """Tokens/s and peak memory per arm, the ratio against plain TRL, and what each choice is worth."""
    s, arms = rec.get("settings") or {}, rec.get("arms") or {}
    lines = [
        f"{rec.get('model', '?')}, one trial of {s.get('steps', '?')} steps (batch {s.get('batch_size', '?')}, "
        f"r {(s.get('params') or {}).get('lora.r', '?')} on {(s.get('params') or {}).get('lora.targets', '?')}), "
        f"each arm in its own process, {s.get('repeats', '?')} runs in alternating order (the median run shown, the faster of two); tokens/s "
        f"counts non-padding tokens over optimizer steps after the first {s.get('skip_steps', '?')}"
        + (" (quick settings: not representative)" if rec.get("quick") else "") + ".",
        "",
        "| arm | tokens/s (runs) | peak memory MB | evals per trial | eval s per trial | precision |"
        + (" MFU |" if rec.get("gpu") else ""),
        "|---|---|---|---|---|---|" + ("---|" if rec.get("gpu") else ""),
    ]
    for name, a in arms.items():
        if "error" in a and a.get("tokens_per_s") is None:
            lines.append(f"| {name} | failed: {str(a['error'])[:80]} | | | | |" + (" |" if rec.get("gpu") else ""))
            continue
        runs = ", ".join(_num(x, ".0f") for x in a.get("tokens_per_s_runs") or [])
        lines.append(
            f"| {name}: {a.get('what', '')} | {_num(a.get('tokens_per_s'), '.1f')} ({runs}) | "
            f"{_num(a.get('peak_memory_mb'), '.0f')} | {a.get('evals', '-')} x {a.get('eval_rows', '-')} rows | "
            f"{_num(a.get('eval_s'), '.1f')} | {a.get('precision', '-')} |"
            + (f" {_num(a.get('mfu'), '.1%')} |" if rec.get("gpu") else ""))
    lines.append("")
    for key, r in (rec.get("ratios") or {}).items():
        ours, peer = key.split("_vs_")
        lines.append(f"- {ours} against {peer}: tokens/s x{_num(r.get('tokens_per_s'), '.2f')} (target >= "
                     f"{r.get('target', '?')}: {_met(r.get('met'))}), peak memory x{_num(r.get('peak_memory'), '.2f')}.")
    for gain, g in (rec.get("gains") or {}).items():
        if "eval_s" in g:
            lines.append(f"- {gain}: x{_num(g.get('speedup'), '.2f')} less eval time ({g.get('what', '')}).")
        else:
            state = "taken" if g.get("taken", True) else "not taken by default here"
            lines.append(f"- {gain} ({state}): x{_num(g.get('speedup'), '.2f')} tokens/s "
                         f"({' vs '.join(_num(x, '.1f') for x in g.get('tokens_per_s_with_without') or [])}).")
    return lines


STORAGE_LABELS = {"in_memory": "in memory (no storage: the floor)", "sqlite": "SQLite (file)",
                  "journal": "Journal (file)", "postgresql": "PostgreSQL", "grpc_proxy": "gRPC proxy"}


def _cell(text, limit: int) -> str:
    """Text for one markdown table cell: one line, no pipes, at most `limit` characters."""
    return " ".join(str(text).replace("|", "/").split())[:limit]


def render_scale(rec: dict) -> list[str]:
    """Trials per hour with 1, 2 and 4 workers per model, and each study storage's cost per trial."""
    lines = []
    models = (rec.get("workers") or {}).get("models") or {}
    if models:
        names = list(models)
        budgets = "; ".join(f"{m}: {d.get('n_trials', '?')} trials of "
                            f"{(d.get('trial') or {}).get('trainer.max_steps', '?')} steps"
                            for m, d in models.items() if "runs" in d)
        lines += [f"`python -m lora_search stage=search sweep=rank_lr sweep.pruner=none sweep.workers=N` on "
                  f"{rec.get('cores', '?')} CPU cores ({budgets}); the workers split the cores, so more workers than "
                  "cores do not add throughput. Trials/hour from the command's start to the last finished trial "
                  "(mean trial duration in brackets)" + (" (quick settings: not representative)" if rec.get("quick")
                                                         else "") + f"; 1-minute load average "
                  f"{_num((rec.get('load_average_before') or [None])[0], '.2f')} before the benchmark, "
                  f"{_num((rec.get('load_average_after') or [None])[0], '.2f')} after it.", "",
                  "| workers | storage | " + " | ".join(f"{m} trials/hour" for m in names) + " | finished = n_trials |",
                  "| ---: | --- | " + " | ".join("---:" for _ in names) + " | --- |"]
        keys = []
        for d in models.values():
            keys += [(r.get("workers"), r.get("storage")) for r in d.get("runs") or [] if
                     (r.get("workers"), r.get("storage")) not in keys]
        for workers, store in keys:
            cells, exact = [], []
            for m in names:
                row = next((r for r in models[m].get("runs") or [] if (r.get("workers"), r.get("storage")) ==
                            (workers, store)), None)
                if row is None:
                    cells.append("-")
                elif row.get("trials_per_hour") is None:
                    cells.append(f"failed: {_cell(row.get('error', '?'), 60)}")
                else:
                    cells.append(f"{_num(row['trials_per_hour'], '.0f')} ({_num(row.get('trial_mean_s'))} s)")
                    ran = len(row.get("trials_per_worker") or [])
                    exact.append(f"{row.get('finished')}/{row.get('n_trials')}"
                                 + (f" ({m}: {ran} of {workers} workers ran trials)" if ran < (workers or 0) else ""))
            lines.append(f"| {workers} | {store} | " + " | ".join(cells) + f" | {', '.join(exact) or '-'} |")
    st = rec.get("storage") or {}
    results = st.get("results") or {}
    if results:
        lines += ([""] if lines else []) + [
            f"Storage cost per trial: {st.get('trials', '?')} no-op trials ({st.get('loop', '')}) on a fresh study "
            "through `lora_search.scale.storage.open_url`, random sampler (seed 0); TPE beside it "
            f"({st.get('tpe_trials', '?')} trials; its own cost grows with the trials).", "",
            "| storage | ms/trial (random) | first / last 100 | total s | ms/trial (TPE) |",
            "| --- | ---: | --- | ---: | ---: |"]
        for kind, r in results.items():
            label = STORAGE_LABELS.get(kind, kind) + (f" in front of {r['behind']}" if r.get("behind") else "")
            if "skipped" in r or "error" in r:
                lines.append(f"| {label} | {'skipped' if 'skipped' in r else 'failed'}: "
                             f"{_cell(r.get('skipped') or r.get('error'), 100)} | | | |")
                continue
            rnd, tpe = r.get("random") or {}, r.get("tpe") or {}
            lines.append(f"| {label} | {_num(rnd.get('ms_per_trial'), '.2f')} | "
                         f"{_num(rnd.get('ms_per_trial_first_100'), '.2f')} / "
                         f"{_num(rnd.get('ms_per_trial_last_100'), '.2f')} | {_num(rnd.get('total_s'))} | "
                         f"{_num(tpe.get('ms_per_trial'), '.2f')} |")
    return lines or ["(no figures)"]


def _pct(value, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def render_search_quality(rec: dict) -> list[str]:
    """Each sampler's gap to the grid's best at 25% of the grid's compute, the shipped budget's, and Spearman."""
    s, ref = rec.get("settings") or {}, rec.get("reference") or {}
    grid = s.get("grid") or {}
    d = s.get("default") or {}
    lines = [f"Ground truth: every configuration of a {' x '.join(str(len(v)) for v in grid.values())} grid "
             f"({', '.join(k.split('.')[-1] for k in grid)}; {ref.get('configurations')} configurations, dropout "
             f"{(s.get('fixed') or {}).get('lora.dropout')}) trained at the trial budget with training seeds "
             f"{', '.join(map(str, s.get('training_seeds') or []))}; a configuration's true score is its mean. "
             f"Grid best: {ref.get('best')} ({_num(ref.get('best_value'), '.4f')}); one pass over the grid: "
             f"{_num((ref.get('compute_s') or 0) / 60)} min; the two seeds of one configuration differ by "
             f"{_pct(ref.get('seed_noise_relative'))} (median). Samplers replayed on the grid as a table with "
             f"{s.get('sampler_seeds')} sampler seeds each ({s.get('cost_model')}).", "",
             "| sampler | within 1% at 25% compute (share of seeds) | within the seed noise | median gap at 25% | "
             f"compute to within 1% (median of the seeds that got there) | n_trials={d.get('n_trials')}: compute, gap |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for arm, f in (rec.get("arms") or {}).items():
        shipped = f.get("shipped_n_trials") or {}
        lines.append(f"| {arm} | {_pct(f.get('within_goal_at_25pct'), 0)} | {_pct(f.get('within_seed_noise_at_25pct'), 0)}"
                     f" | {_pct(f.get('gap_at_25pct_median'), 2)} | {_pct(f.get('compute_to_within_1pct_median'), 0)} of "
                     f"the grid | {_pct(shipped.get('compute_fraction_median'), 0)}, {_pct(shipped.get('gap_median'), 2)} |")
    by_n = [(arm, f.get("by_n_trials") or {}) for arm, f in list((rec.get("arms") or {}).items())[:2]]
    if all(b for _, b in by_n):
        lines += ["", "After n trials (median gap; share of sampler seeds within the seed noise; compute): " + "; ".join(
            f"{arm}: " + ", ".join(f"{n} trials {_pct(v.get('gap_median'))}, {_pct(v.get('within_seed_noise'), 0)}, "
                                   f"{_pct(v.get('compute_fraction_median'), 0)}" for n, v in b.items())
            for arm, b in by_n) + "."]
    once = ref.get("one_seed_grid") or {}
    if once:
        lines += ["", "The grid itself, trained once (100% of its compute): "
                  + "; ".join(f"seed {k} picks {v['pick']}, {_pct(v['gap'])} from the two-seed best"
                              for k, v in once.items()) + "."]
    goals = rec.get("goals") or {}
    g1, g2 = goals.get("default_within_1pct_at_25pct_compute") or {}, goals.get("spearman_top5") or {}
    agree = rec.get("agreement") or {}
    lines += ["", f"Goal, the default within 1% of the grid best at 25% of its compute (median over seeds): "
              f"{_met(g1.get('met'))} (median gap {_pct(g1.get('median_gap'), 2)}). Short-vs-full agreement: the "
              f"{agree.get('top')} best configurations re-trained at {agree.get('steps')} steps, Spearman "
              f"{_num(g2.get('value'), '.2f')} (goal >= {g2.get('goal')}: {_met(g2.get('met'))})."]
    return lines


RENDERERS = {"search_quality": render_search_quality, "load_time": render_load_time, "peer_sweep": render_peer_sweep, "overhead": render_overhead,
             "pruning": render_pruning, "throughput": render_throughput, "dpo_sweep": render_dpo_sweep,
             "pareto_sweep": render_pareto_sweep, "memory_estimate": render_memory_estimate, "scale": render_scale}


def render(records: list[dict], problems: list[str] = (), heading: str = "## Measurements") -> str:
    """The markdown section for these records."""
    lines = [heading, ""]
    if not records:
        lines.append("No benchmark records yet: `make bench` writes them to `results/bench/`.")
    else:
        lines.append("Measured by `make bench` (scripts in `benchmarks/`); each figure below comes from the "
                     "record named in its heading, which also holds every per-trial figure and the package versions.")
    for rec in records:
        name = str(rec.get("name"))
        lines += ["", f"### {TITLES.get(name, name)} (`{rec.get('_file', f'results/bench/{name}.json')}`)", ""]
        try:
            lines += RENDERERS.get(name, render_generic)(rec)
        except Exception:  # a record of an older shape: show what it has
            lines += render_generic(rec)
        lines += ["", f"Machine: {common.machine_line(rec.get('provenance'))}."]
    if problems:
        lines += ["", "Skipped: " + "; ".join(problems) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    """Print the section for the records in --dir (default results/bench/)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=str(common.BENCH_DIR), help="folder of <name>.json records")
    p.add_argument("--update", help="a markdown page (docs/performance.md) whose text between the performance "
                                     "markers is replaced")
    p.add_argument("--check", help="a markdown page whose section must be what the records say (exit 1 if not)")
    a = p.parse_args(argv)
    records, problems = common.read_records(a.dir)
    text = render(records, problems)
    if a.check:
        if section(Path(a.check)) != text.rstrip():
            raise SystemExit(f"{a.check}: the performance section differs from the records in {a.dir}; run "
                             f"benchmarks/readme_section.py --update {a.check}")
        print(f"{a.check}: the performance section is what the records say")
    elif a.update:
        update(Path(a.update), text)
    else:
        print(text, end="")
    return text


BEGIN, END = "<!-- performance:begin (generated by benchmarks/readme_section.py) -->", "<!-- performance:end -->"


def section(page: Path) -> str:
    """The generated text of a markdown page (between BEGIN and END), stripped."""
    old = page.read_text()
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{page} has no performance markers ({BEGIN} ... {END})")
    return old.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def update(readme: Path, text: str) -> None:
    """Replace the generated section of a markdown page (between BEGIN and END)."""
    old = readme.read_text()
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{readme} has no performance markers ({BEGIN} ... {END})")
    head, rest = old.split(BEGIN, 1)
    readme.write_text(f"{head}{BEGIN}\n{text.rstrip()}\n{END}{rest.split(END, 1)[1]}")
    print(f"updated the performance section of {readme}")


if __name__ == "__main__":
    main()
