"""The online RL sweep end to end: `python -m lora_search sweep=grpo_kl` (search over beta, the clip range, the learning
rate and the answers per prompt; promotion, merge, benchmark, report) on the embedded RL task, as a user runs it, in
a fresh results folder; the held-out exact match of the base and the tuned model side by side, the full run's
held-out reward against the base's, and the wall time.

  .venv/bin/python benchmarks/grpo_sweep.py            # writes results/bench/grpo_sweep.json

Targets (issue 24): at most 20 minutes on the 2-core CPU, and at least +20 points of held-out exact match.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

TARGET_S, TARGET_POINTS = 20 * 60, 20.0


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep in a fresh results folder, write results/bench/grpo_sweep.json, return the record."""
    from lora_search.core import records

    extra = list(sys.argv[1:] if argv is None else argv)
    with common.cli_sweep("grpo_kl", extra) as (wall, out, study):
        bench = records.read_json(out / "benchmark.json")
        full = records.read_json(out / "full" / "metrics.json")
        states = [t.state.name.lower() for t in study.trials]
        base, tuned = bench["base"], bench["tuned"]
        lift = 100 * (tuned["exact_match"] - base["exact_match"])
        rec = common.record("grpo_sweep", {
            "command": " ".join(["python -m lora_search sweep=grpo_kl", *extra]),
            "wall_s": round(wall, 1),
            "target_s": TARGET_S,
            "within_time": wall <= TARGET_S,
            "held_out_items": tuned.get("exact_match_items"),
            "base_exact_match": base["exact_match"],
            "tuned_exact_match": tuned["exact_match"],
            "lift_points": round(lift, 1),
            "target_points": TARGET_POINTS,
            "lift_met": lift >= TARGET_POINTS,
            "latency_p50_s": {"base": base.get("latency_p50_s"), "tuned": tuned.get("latency_p50_s")},
            "trials": {s: states.count(s) for s in sorted(set(states))},
            "best_params": study.best_trial.params,
            "best_trial_value": study.best_value,
            "full_run": {k: full.get(k) for k in ("steps", "step_s", "base_reward", "reward", "kl", "train_kl_max",
                                                   "train_reward_first", "train_reward_last", "diverged", "wall_s")},
        })
    path = common.write_record(rec)
    print(f"{path}: {wall / 60:.1f} min, held-out exact match {100 * base['exact_match']:.0f}% -> "
          f"{100 * tuned['exact_match']:.0f}% ({lift:+.0f} points)")
    return rec


if __name__ == "__main__":
    main()
