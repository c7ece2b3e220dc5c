"""The report's section on what the promoted adapter learned (promote/weights.py's analysis): the layers and modules
that moved most, the effective ranks, a smaller rank where every update is well below r, and the heatmaps."""

from __future__ import annotations

import statistics

from lora_search.report.tables import table


def _ranges(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    spans: list[list[int]] = []
    for layer in sorted(layers):
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _largest(analysis: dict) -> str:
    """Where the largest updates are: the module with the largest total norm, and its layers within half its max."""
    summary = analysis["summary"]
    if summary["norm_total"] <= 0:
        return "every update is zero (the adapter has not moved from its initialisation)"
    module = max(summary["norm_by_module"], key=summary["norm_by_module"].get)
    mine = [e for e in analysis["entries"] if e["module"] == module and e["layer"] is not None]
    if not mine:
        return f"the largest updates are in {module}"
    top = max(e["norm"] for e in mine)
    layers = [e["layer"] for e in mine if e["norm"] >= top / 2]
    where = _ranges(layers)
    if where.count(",") >= 5:  # scattered: name the single largest
        layers = [max(mine, key=lambda e: e["norm"])["layer"]]
        where = str(layers[0])
    return f"the largest updates are in {module} of layer{'s' if len(layers) > 1 else ''} {where}"


def report_lines(analysis: dict, plots_rel: str = "plots") -> list[str]:
    """Markdown lines for the report's "What the adapter learned" section."""

    if not analysis:
        return []
    s, r = analysis["summary"], analysis["r"]
    n_layers, n_modules = len(analysis["layers"]), len(analysis["modules"])
    median = s["effective_rank_median"]
    median = int(median) if float(median).is_integer() else median
    lines = ["## What the adapter learned", "",
             f"Across {n_layers} layer{'s' * (n_layers != 1)} x {n_modules} module{'s' * (n_modules != 1)}, the "
             f"update's effective rank ({analysis['energy']:.0%} of energy) is median {median}, max "
             f"{s['effective_rank_max']}, of r={r}; {_largest(analysis)}."]
    if s.get("suggestion"):
        lines.append(s["suggestion"][:1].upper() + s["suggestion"][1:] + ".")
    lines.append("")
    captions = {"effective_rank": ("Effective rank per layer and module", "how many singular values of scaling x "
                                   f"B @ A hold {analysis['energy']:.0%} of its energy, of r={r}."),
                "norm": ("Update norm per layer and module", "the Frobenius norm of scaling x B @ A.")}
    for what, name in (analysis.get("plots") or {}).items():
        alt, caption = captions[what]
        lines += [f"![{alt}]({plots_rel}/{name})", f"*{alt}: {caption}*", ""]
    rows = []
    for module in analysis["modules"]:
        mine = [e for e in analysis["entries"] if e["module"] == module]
        biggest = max(mine, key=lambda e: e["norm"])
        where = f" (layer {biggest['layer']})" if biggest["layer"] is not None else ""
        ranks = [e["effective_rank"] for e in mine]
        rows.append([module, statistics.fmean(e["norm"] for e in mine), f"{biggest['norm']:.4g}{where}",
                     statistics.median(ranks), max(ranks)])
    lines += table(["module", "mean norm", "max norm (layer)", "median eff. rank", "max eff. rank"], rows).split("\n")
    lines.append("")
    return lines
