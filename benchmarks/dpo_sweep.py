"""The preference-tuning sweep end to end: `python -m lora_search sweep=dpo_beta` (search over beta and the learning
rate, promotion, merge, benchmark, report) on the embedded preference task, as a user runs it, in a fresh results
folder; the held-out preference accuracy of the base and the tuned model side by side, and the wall time.

  .venv/bin/python benchmarks/dpo_sweep.py            # writes results/bench/dpo_sweep.json

Targets (issue 14): at most 15 minutes on the 2-core CPU, and at least +20 points of held-out preference accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common as common  # noqa: E402

TARGET_S, TARGET_POINTS = 15 * 60, 20.0


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep in a fresh results folder, write results/bench/dpo_sweep.json, return the record."""
    from lora_search.core import records

    extra = list(sys.argv[1:] if argv is None else argv)
    with common.cli_sweep("dpo_beta", extra) as (wall, out, study):
        bench = records.read_json(out / "benchmark.json")
        full = records.read_json(out / "full" / "metrics.json")
        states = [t.state.name.lower() for t in study.trials]
        base, tuned = bench["base"], bench["tuned"]
        lift = 100 * (tuned["preference_accuracy"] - base["preference_accuracy"])
        rec = common.record("dpo_sweep", {
            "command": " ".join(["python -m lora_search sweep=dpo_beta", *extra]),
            "wall_s": round(wall, 1),
            "target_s": TARGET_S,
            "within_time": wall <= TARGET_S,
            "held_out_pairs": tuned["preference_pairs"],
            "base_preference_accuracy": base["preference_accuracy"],
            "tuned_preference_accuracy": tuned["preference_accuracy"],
            "lift_points": round(lift, 1),
            "target_points": TARGET_POINTS,
            "lift_met": lift >= TARGET_POINTS,
            "base_logp_margin": base["logp_margin"],
            "tuned_logp_margin": tuned["logp_margin"],
            "tuned_reward_accuracy": tuned["reward_accuracy"],
            "tuned_reward_margin": tuned["reward_margin"],
            "latency_p50_s": {"base": base["latency_p50_s"], "tuned": tuned["latency_p50_s"]},
            "trials": {s: states.count(s) for s in sorted(set(states))},
            "best_params": study.best_trial.params,
            "best_trial_value": study.best_value,
            "full_run": {k: full.get(k) for k in ("steps", "preference_accuracy", "reward_accuracy", "eval_loss",
                                                   "wall_s")},
        })
    path = common.write_record(rec)
    print(f"{path}: {wall / 60:.1f} min, held-out preference accuracy {100 * base['preference_accuracy']:.0f}% -> "
          f"{100 * tuned['preference_accuracy']:.0f}% ({lift:+.0f} points)")
    return rec


if __name__ == "__main__":
    main()
