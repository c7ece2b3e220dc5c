"""The study's W&B summary run: headline numbers, importances with intervals, the promotion's agreement, what the
promoted adapter learned, and the report's plots (tracking.log_sweep_summary logs it)."""

from __future__ import annotations

from pathlib import Path

from lora_search.config.schema import RunConfig
from lora_search.core import records
from lora_search.promote import weights
from lora_search.report import confidence
from lora_search.train import tracking


def log_study(study, cfg: RunConfig, out: Path, report_dir: Path | None = None) -> None:
    """The sweep summary run for a study, with the plots of the report in report_dir (default out)."""
    if not tracking.enabled(cfg):
        return
    summary = confidence.summary(study, cfg.sweep.metric)
    promotion = (records.read_json(Path(out) / "full" / "metrics.json") or {}).get("promotion") or {}
    if promotion:  # how well the short trials ranked the full runs, and which trial won at the full budget
        summary.update({"promotion/spearman": promotion.get("spearman"), "promotion/top_k": promotion.get("top_k"),
                        "promotion/chosen": promotion.get("chosen"), "promotion/best_trial": promotion.get("best_trial")})
    analysis = records.read_json(Path(out) / "full" / "weights.json")
    if analysis:  # what the promoted adapter learned (weights.py): its heatmaps come with the report's plots
        summary.update(weights.wandb_summary(analysis))
    pngs = {p.stem: p for p in sorted(Path(report_dir or out).glob("plots/*.png"))}
    tracking.log_sweep_summary(cfg, out, summary, summary.get("importances") or {}, pngs)
