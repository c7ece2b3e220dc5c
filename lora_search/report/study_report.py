"""results/<study>/report.md and report.html: the trials, what mattered (importances and Optuna's
plots, drawn by plots.py into plots/), the winner, the full run against its trial, the merge and the
benchmark, from the study's storage and the records on disk alone.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from lora_search.core import records
from lora_search.report import confidence, importance, plots, weights_section
from lora_search.report import html_page as page
from lora_search.report.tables import cell, table


def _kind(spec) -> str:
    return spec if isinstance(spec, str) else spec.get("type")


def trial_rows(study: optuna.Study, metric: str) -> tuple[list[str], list[list]]:
    """One row per trial: number, state, params, the objective(s), exact match, peak memory, steps, seconds, reason."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    names = list(study.metric_names or []) if len(study.directions) > 1 else [metric]
    # a DPO study: its trials' preference measures; otherwise exact match
    extra = [k for k in ("reward_accuracy", "preference_accuracy") if k not in names and
             any(k in t.user_attrs for t in trials)] or [k for k in ["exact_match"] if k not in names and any(
                 t.user_attrs.get(k) is not None for t in trials)]
    if any(t.user_attrs.get("memory_budget_mb") for t in trials):  # a memory-aware study: estimate vs measured
        extra += [k for k in ("estimated_memory_mb", "peak_memory_mb") if k not in names]
    header = ["#", "state", *[k.split(".")[-1] for k in keys], *names, *[k.replace("_", " ") for k in extra], "steps",
              "s", "reason"]
    rows = []
    for t in trials:
        attrs = t.user_attrs
        steps = attrs.get("steps") or (t.last_step if t.state == optuna.trial.TrialState.PRUNED else None)
        seconds = t.duration.total_seconds() if t.duration else attrs.get("wall_s")
        state = attrs.get("status") if attrs.get("status") == "infeasible" else t.state.name.lower()
        reason = attrs.get("reason") or attrs.get("over_budget") or ""
        rows.append([t.number, state, *[t.params.get(k) for k in keys], *(t.values or [None] * len(names)),
                     *[attrs.get(k) for k in extra], steps, seconds, reason])
    return header, rows


def _front_section(study: optuna.Study, best: dict | None) -> list[str]:
    """The Pareto front's trials, and the promotion rule's verdict on each (from best.json)."""
    if len(study.directions) < 2:
        if best and best.get("selection", {}).get("candidates"):
            sel = best["selection"]
            rows = [[c["trial"], *c["values"].values(), c["outcome"]] for c in sel["candidates"]]
            return ["## Promotion rule", "", f"Chosen: #{sel['chosen']}, {sel['rule_text']}.", "",
                    table(["#", *sel["candidates"][0]["values"], "outcome"], rows), ""]
        return []
    names = list(study.metric_names or [])
    sel = (best or {}).get("selection") or {}
    verdict = {c["trial"]: c["outcome"] for c in sel.get("front", [])}
    front = sorted(study.best_trials, key=lambda t: t.number)
    rows = [[t.number, *t.values, ", ".join(f"{k.split('.')[-1]}={cell(v)}" for k, v in t.params.items()),
             verdict.get(t.number, "")] for t in front]
    lines = ["## Pareto front", "",
             f"{len(front)} trial(s) no other trial beats on every objective ({', '.join(names)}); trials over the "
             "memory budget are left out. Optuna's pruners are single-objective, so no trial of this study was "
             "pruned by a pruner (a diverging one still stops).", ""]
    if sel:
        rule = "`sweep.promotion.select`" if sel.get("rule") else "the default rule (no `sweep.promotion.select`)"
        lines += [f"Promoted: #{sel['chosen']}, chosen by {rule}: {sel['rule_text']}.", ""]
    return lines + [table(["#", *names, "params", "promotion"], rows), ""]


def _benchmark_section(bench: dict) -> list[str]:
    names = [n for n in ("base", "tuned", "adapter", "int8_dynamic") if n in bench]
    fields = [("eval_loss", "eval loss"), ("perplexity", "perplexity"), ("exact_match", "exact match"),
              ("rouge_l", "ROUGE-L F (0-1)"), ("bleu", "BLEU (0-100)"),
              ("preference_accuracy", "preference accuracy (held-out pairs)"),
              ("logp_margin", "mean log-prob margin (chosen - rejected)"),
              ("reward_accuracy", "reward accuracy (vs base)"), ("reward_margin", "reward margin (vs base)"),
              ("latency_p50_s", "latency p50 (s)"), ("latency_p95_s", "latency p95 (s)"),
              ("tokens_per_s", "tokens/s"), ("peak_memory_mb", "peak memory (MB)"), ("size_mb", "size (MB)")]
    rows = [[label, *[bench[n].get(key) for n in names]] for key, label in fields
            if any(bench[n].get(key) is not None for n in names)]
    return ["## Benchmark: base vs tuned", "", table(["", *names], rows), ""]


def _search_sections(shares: dict, drawn: dict, metric: str, n_complete: int, intervals: dict) -> list[str]:
    lines = []
    if shares:
        level = f"{importance.LEVEL:.0%} interval"
        rows = [[k, importance.readable(k), f"{v:.0%}",
                 f"{100 * intervals[k][0]:.0f}-{intervals[k][1]:.0%}" if k in intervals else "not estimated"]
                for k, v in shares.items()]
        how = (f"The interval is the middle {importance.LEVEL:.0%} of the shares re-estimated on {importance.RESAMPLES} "
               f"bootstrap resamples of the {n_complete} complete trials; a parameter is ranked above another only "
               "where its interval lies wholly above the other's." if intervals else
               "No interval could be estimated from these trials (too few, or too alike): read no order into them.")
        lines += ["## Parameter importances", "", f"{importance.method_description(n_complete=n_complete)}. {how}", "",
                  table(["parameter", "name", "share", level], rows), ""]
    if drawn:
        lines += ["## Plots", ""]
        for name, (alt, caption) in plots.captions(metric.replace("_", " "), n_complete).items():
            if name in drawn:
                lines += [f"![{alt}](plots/{drawn[name].name})", f"*{caption}*", ""]
    return lines


def _promotion_section(metric: str, full: dict, out: Path) -> list[str]:
    """The full runs of the top trials, which one was promoted, and how well trial scores predicted full-run scores."""
    promo = full.get("promotion") or {}
    delta = full["full_value"] - full["trial_value"]
    lines = ["## Promotion", "",
             f"The promoted full run ({full['steps']} steps) reached {metric} {full['full_value']:.4f}, against "
             f"{full['trial_value']:.4f} in its trial ({'+' if delta >= 0 else ''}{delta:.4f}); "
             f"exact match {cell(full.get('exact_match'))}. Adapter: `{out / 'full' / 'adapter'}`.", ""]
    rows = promo.get("candidates") or []
    seeds = promo.get("seeds") or []
    if len(seeds) > 1 and full.get("full_mean") is not None:
        lines += [f"Over {len(seeds)} training seeds ({', '.join(map(str, seeds))}) the promoted configuration's "
                  f"{metric} is {full['full_mean']:.4f} +/- {cell(full.get('full_sd'))} (mean +/- standard "
                  f"deviation; runs: {', '.join(cell(v) for v in full.get('full_values') or [])}).", ""]
    if len(rows) > 1:
        head = ["#", f"trial {metric}", f"full-run {metric}" + (" (mean)" if len(seeds) > 1 else "")]
        head += ["sd"] if len(seeds) > 1 else []
        body = [[r["trial"], r["trial_value"], r["full_mean"], *([r["full_sd"]] if len(seeds) > 1 else [])]
                + (["promoted"] if r["trial"] == promo.get("chosen") else [""]) for r in rows]
        rho = promo.get("spearman")
        said = (f"Spearman's rank correlation between trial and full-run scores over these {promo.get('pairs')} "
                f"configurations: {rho:.2f}." if rho is not None else
                "The rank correlation between trial and full-run scores is undefined here (ties or too few runs).")
        lines += [f"The {len(rows)} best trials were re-trained at the full budget (`sweep.promotion.top_k`); the best "
                  f"full run was promoted. {said}", "", table([*head, ""], body), ""]
        if promo.get("warning"):
            lines += [f"**Warning: {promo['warning']}.**", ""]
    return lines


def write_report(study: optuna.Study, cfg, out: Path, title: str | None = None, preface: list[str] = ()) -> Path:
    """Write report.md, report.html and plots/ for a study folder (a night's sections first when given)."""
    s = cfg.sweep
    states = ["infeasible" if t.user_attrs.get("status") == "infeasible" else t.state.name.lower()
              for t in study.get_trials(deepcopy=False)]
    shares, drawn = importance.importances(study, cfg.sweep.metric), plots.write_plots(study, cfg, out)
    n_complete = states.count("complete")
    intervals = importance.importance_intervals(study, shares, cfg.sweep.metric)
    evidence = confidence.paired_sentence(confidence.paired_evidence(study, s.metric), s.metric)
    counts = ", ".join(f"{states.count(k)} {k}" for k in ("complete", "pruned", "infeasible", "fail", "running")
                      if k in states)
    title = title or f"Study `{s.name}`"
    several = len(study.directions) > 1
    objective = (f"objectives: {', '.join(f'{d.name.lower()} `{m}`' for d, m in zip(study.directions, study.metric_names or []))}"
                 if several else f"objective: {s.direction} `{s.metric}`")
    budget = f"; memory budget {cell(s.memory_budget_mb)} MB" if s.memory_budget_mb is not None else ""
    lines = [f"# {title}", "", *preface,
             f"Model `{cfg.model.name}`, data `{cfg.data.name}`, quantization `{cfg.quant.name}`; {objective}; "
             f"sampler {_kind(s.sampler)}, pruner {'none (several objectives)' if several else _kind(s.pruner)}{budget}.",
             "", f"**What mattered.** {importance.importance_sentence(shares, s.metric, n_complete=n_complete, intervals=intervals)}",
             "", *([f"**Paired comparison.** {evidence} {confidence.seed_sentence(s.space, cfg.trainer.seed)}", ""]
                   if evidence else []),
             f"## Trials ({len(states)}: {counts})", ""]
    header, rows = trial_rows(study, s.metric)
    lines += [table(header, rows), ""]
    best = records.read_json(out / "best.json")
    lines += _front_section(study, best)
    if best:
        params = ", ".join(f"`{k}={v}`" for k, v in best["params"].items())
        first = (best.get("promotion") or {}).get("best_trial", best["trial"])
        title_best = "Promoted trial" if first != best["trial"] else "Best trial"
        lines += [f"## {title_best}: #{best['trial']}", "", f"{s.metric} {best['value']:.4f} in its trial with {params}"
                  + (f"; the best short trial was #{first}, but its full run lost (below)." if first != best["trial"]
                     else "."), ""]
    lines += _search_sections(shares, drawn, s.metric, n_complete, intervals)
    full = records.read_json(out / "full" / "metrics.json")
    if full and full.get("full_value") is not None:
        lines += _promotion_section(s.metric, full, out)
    analysis = records.read_json(out / "full" / "weights.json")
    if analysis:
        lines += [*weights_section.report_lines(analysis, "plots"), ""]
    merge = records.read_json(out / "merge.json")
    if merge:
        lines += ["## Merge", "", f"Merged model: `{merge.get('merged_dir')}` ({cell(merge.get('merged_size_mb'))} MB; "
                  f"adapter {cell(merge.get('adapter_size_mb'))} MB); merged and unmerged logits differ by at most "
                  f"{cell(merge.get('max_logit_diff'))}.", ""]
    bench = records.read_json(out / "benchmark.json")
    if bench:
        lines += _benchmark_section(bench)
    path = out / "report.md"
    records.write_text(path, "\n".join(lines))
    records.write_text(out / "report.html", page.markdown_to_html("\n".join(lines), out, title=title.replace("`", "")))
    return path
