"""What the adapter learned: per layer and module, the norm of the LoRA update dW = scaling * B @ A and its
effective rank (how many singular values hold 90% of its energy), from the saved adapter alone.

The singular values come from the r x r core of two thin QR factorizations (B = Q_B R_B, A^T = Q_A R_A, so
dW = Q_B (scaling * R_B R_A^T) Q_A^T): the out x in matrix is never formed. When the effective rank is well below
r everywhere (at most r/2), the analysis suggests the smallest power-of-two rank that still holds it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from lora_search.core import records
from lora_search.models.adapters import lora_key

log = logging.getLogger(__name__)

ENERGY = 0.9  # the share of sum(s^2) the effective rank holds
LAYER = re.compile(r"\.(\d+)\.")
ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a block's reading order
PLOTS = {"effective_rank": "weights_effective_rank.png", "norm": "weights_norm.png"}
TITLES = {"effective_rank": f"Effective rank of the LoRA update ({ENERGY:.0%} of energy)",
          "norm": "Frobenius norm of the LoRA update (scaling x B @ A)"}


def effective_rank(singular_values, energy: float = ENERGY) -> int:
    """The fewest singular values whose squares hold `energy` of the total; 0 for an all-zero update."""
    sq = [float(s) ** 2 for s in singular_values]
    total = sum(sq)
    if total <= 0:
        return 0
    running = 0.0
    for k, v in enumerate(sorted(sq, reverse=True), start=1):
        running += v
        if running >= energy * total * (1 - 1e-9):  # a tolerance for a share of exactly `energy`
            return k
    return len(sq)


def update_singular_values(a, b, scaling: float):
    """Singular values of scaling * B @ A (B: out x r, A: r x in) from the r x r core, in float64, descending."""
    import torch

    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    _, r_b = torch.linalg.qr(b, mode="reduced")
    _, r_a = torch.linalg.qr(a.T, mode="reduced")
    return torch.linalg.svdvals(scaling * (r_b @ r_a.T))


def _scaling(config: dict, module: str, r: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", r))
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _pairs(tensors: dict) -> dict[str, dict]:
    """Module path (without PEFT's prefix) -> {"A": tensor, "B": tensor}; other keys (modules_to_save) ignored."""
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        found = lora_key(key)
        if found:
            pairs.setdefault(found[0], {})[found[1]] = tensor
    return {m: p for m, p in pairs.items() if set(p) == {"A", "B"}}


def _layer(module_path: str) -> int | None:
    found = LAYER.search(f".{module_path}.")
    return int(found.group(1)) if found else None


def _load(adapter_dir: Path) -> tuple[dict, dict] | None:
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not (config_path.is_file() and weights_path.is_file()):
        log.info("weight analysis skipped: no adapter_config.json and adapter_model.safetensors in %s", adapter_dir)
        return None
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path), device="cpu")
    except Exception as e:  # an unreadable adapter: the report goes on without the analysis
        log.info("weight analysis skipped: %s: %s", type(e).__name__, e)
        return None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        log.info("weight analysis skipped: %s is a %s adapter, not LoRA", adapter_dir, config.get("peft_type"))
        return None
    return config, tensors


def _module_order(modules) -> list[str]:
    """Attention then MLP projections in a block's order, anything else after them by name."""
    found = set(modules)
    return [m for m in ORDER if m in found] + sorted(found - set(ORDER))


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _summary(entries: list[dict], r: int) -> dict:
    ranks = [e["effective_rank"] for e in entries]
    modules = _module_order(e["module"] for e in entries)
    norm_total = math.sqrt(sum(e["norm"] ** 2 for e in entries))
    max_rank = max(ranks)
    suggested = _power_of_two_at_least(max_rank) if norm_total > 0 else None
    if suggested is not None and not (max_rank <= r / 2 and suggested < r):
        suggested = None
    suggestion = (f"effective rank is at most {max_rank} of r={r} in every layer and module: r={suggested} would "
                  f"likely do (sweep lora.r lower)") if suggested else None
    return {
        "n_entries": len(entries),
        "effective_rank_median": statistics.median(ranks),
        "effective_rank_max": max_rank,
        "share_rank_le_quarter": sum(e["effective_rank"] <= e["r"] / 4 for e in entries) / len(entries),
        "norm_total": norm_total,
        "norm_by_module": {m: math.sqrt(sum(e["norm"] ** 2 for e in entries if e["module"] == m)) for m in modules},
        "suggested_r": suggested,
        "suggestion": suggestion,
    }


def analyze(adapter_dir: Path) -> dict | None:
    """Per (layer, module): r, the update's norm, effective rank and top singular value; None without an adapter."""
    loaded = _load(adapter_dir)
    if loaded is None:
        return None
    config, tensors = loaded
    entries = []
    for path, pair in sorted(_pairs(tensors).items(), key=lambda kv: (_layer(kv[0]) or -1, kv[0])):
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            log.info("weight analysis: %s skipped (A %s, B %s are not a LoRA pair)", path, a.shape, b.shape)
            continue
        r = int(a.shape[0])  # the saved shape is the rank (rank_pattern included)
        scaling = _scaling(config, path, r)
        s = update_singular_values(a, b, scaling)
        entries.append({"layer": _layer(path), "module": path.rsplit(".", 1)[-1], "name": path, "r": r,
                        "scaling": scaling, "norm": float(s.square().sum().sqrt()),
                        "effective_rank": effective_rank(s.tolist()), "top_singular_value": float(s.max())})
    if not entries:
        log.info("weight analysis skipped: no LoRA A/B pairs in %s", adapter_dir)
        return None
    r = int(config.get("r") or max(e["r"] for e in entries))
    return {"adapter": str(adapter_dir), "r": r, "lora_alpha": config.get("lora_alpha"),
            "use_rslora": bool(config.get("use_rslora")), "use_dora": bool(config.get("use_dora")),
            "energy": ENERGY, "modules": _module_order(e["module"] for e in entries),
            "layers": sorted({e["layer"] for e in entries if e["layer"] is not None}),
            "entries": entries, "summary": _summary(entries, r)}


def _grid(analysis: dict, what: str) -> list[list[float]]:
    """layers x modules values of `what`; NaN where a module was not adapted in a layer."""
    rows = {layer: i for i, layer in enumerate(analysis["layers"])}
    cols = {m: j for j, m in enumerate(analysis["modules"])}
    grid = [[math.nan] * len(cols) for _ in rows]
    for e in analysis["entries"]:
        if e["layer"] is not None:
            grid[rows[e["layer"]]][cols[e["module"]]] = float(e[what])
    return grid


def heatmap(analysis: dict, path: Path, what: str = "effective_rank") -> Path | None:
    """Draw a layers x modules heatmap of `what` ("effective_rank" or "norm") to a PNG; None when there are no layers."""
    if what not in TITLES:
        raise ValueError(f"what must be one of {sorted(TITLES)}, got {what!r}")
    if not analysis or not analysis["layers"]:
        return None
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # files only, never a window (a notebook keeps its backend)
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.ma.masked_invalid(np.array(_grid(analysis, what), dtype=float))
    layers, modules = analysis["layers"], analysis["modules"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(modules), 1.5 + 0.28 * len(layers)))
    try:
        vmax = analysis["r"] if what == "effective_rank" else None
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        ax.set_title(TITLES[what] + (f", r={analysis['r']}" if what == "effective_rank" else ""), fontsize="medium")
        fig.colorbar(image, ax=ax, label="effective rank" if what == "effective_rank" else "norm")
        if grid.size <= 256:  # numbers in the cells while they stay readable (30 layers x 7 modules: yes)
            fmt = "{:.0f}" if what == "effective_rank" else "{:.2g}"
            for (i, j), value in np.ndenumerate(grid.filled(np.nan)):
                if not math.isnan(value):  # dark text on the colour map's bright end
                    colour = "black" if image.norm(value) > 0.6 else "white"
                    ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize="x-small", color=colour)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def wandb_summary(analysis: dict) -> dict:
    """Flat scalar keys for a W&B run summary (`weights/...`)."""
    if not analysis:
        return {}
    s = analysis["summary"]
    out = {"weights/r": int(analysis["r"]), "weights/effective_rank_median": float(s["effective_rank_median"]),
           "weights/effective_rank_max": int(s["effective_rank_max"]),
           "weights/share_rank_le_quarter": float(s["share_rank_le_quarter"]),
           "weights/norm_total": float(s["norm_total"])}
    for module in analysis["modules"]:
        mine = [e for e in analysis["entries"] if e["module"] == module]
        out[f"weights/{module}/norm_mean"] = float(statistics.fmean(e["norm"] for e in mine))
        out[f"weights/{module}/norm_max"] = float(max(e["norm"] for e in mine))
        out[f"weights/{module}/effective_rank_median"] = float(statistics.median(e["effective_rank"] for e in mine))
        out[f"weights/{module}/effective_rank_max"] = int(max(e["effective_rank"] for e in mine))
    if s.get("suggested_r"):
        out["weights/suggested_r"] = int(s["suggested_r"])
    return out


def write(adapter_dir: Path, out_json: Path, plots_dir: Path) -> dict | None:
    """Analyze the adapter, draw both heatmaps into plots_dir and write the analysis to out_json; None to skip."""
    analysis = analyze(adapter_dir)
    if analysis is None:
        return None
    analysis["plots"] = {}
    for what, name in PLOTS.items():
        try:
            if heatmap(analysis, Path(plots_dir) / name, what) is not None:
                analysis["plots"][what] = name
            else:  # no layered modules: a stale figure from an earlier run would mislead
                (Path(plots_dir) / name).unlink(missing_ok=True)
        except Exception as e:  # a figure that cannot be drawn never stops the report
            log.info("weights heatmap %s skipped: %s: %s", what, type(e).__name__, e)
            (Path(plots_dir) / name).unlink(missing_ok=True)
    records.write_json(Path(out_json), analysis)
    return analysis
