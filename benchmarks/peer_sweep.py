"""A LoRA hyperparameter search three ways, on the same model, data, search space, number of trials,
steps per trial and sampler seed, in one run:

  handwritten  the recipe of the usual LoRA guides: an Optuna objective that, per trial, loads the model
               (AutoModelForCausalLM.from_pretrained of the local safetensors folder), wraps it with a fresh
               LoraConfig/get_peft_model, builds TRL's SFTTrainer evaluating the whole eval set every
               `eval_every` steps, trains, evaluates and returns eval_loss; no pruning; TRL's default precision
  lora_search  `lora_search.commands.pipeline.run` with stage=search, in this process: the base loaded once, a fresh
               adapter per trial, cheap evals on a fixed subset, median pruning, bf16 autocast where it pays
  hf_search    transformers' Trainer.hyperparameter_search(backend="optuna") on an SFTTrainer whose
               model_init builds base + LoRA per trial from the values sampled on the trial

Each approach's best configuration is then trained once more with the hand-written code (untimed) and
evaluated on the whole eval set, so the best losses compare like with like.

  .venv/bin/python benchmarks/peer_sweep.py            # embedded SmolLM2, 8 trials -> results/bench/peer_sweep.json
  .venv/bin/python benchmarks/peer_sweep.py --quick    # tiny model, 2 trials of 4 steps (seconds; the tests use it)

Options: --model, --trials, --repeats (alternating order a, ours, b / b, ours, a), --peer-precision
(trl: TRL's defaults, bf16 mixed; fp32), --threads (torch CPU threads for all), --cache-dir, --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import TrainerCallback  # noqa: E402

from benchmarks import _common as common  # noqa: E402
from benchmarks._common import ROOT  # noqa: E402
from lora_search.commands import pipeline
from lora_search.config.compose import load_config  # noqa: E402
from lora_search.config.schema import RunConfig  # noqa: E402
from lora_search.core import (
    hardware,
    records,  # noqa: E402
)
from lora_search.data.load import load_task_data  # noqa: E402
from lora_search.models import loaders
from lora_search.search import study as study_lib  # noqa: E402
from lora_search.train.evaluate import StepTimer, timed_evaluate  # noqa: E402

log = logging.getLogger("peer_sweep")
NAME = "peer_sweep"
ORDER = ("handwritten", "lora_search", "hf_search")  # a, ours, b; reversed on every second repeat
QUICK = [
    "data.train_per_task=8",
    "data.eval_per_task=4",
    "trainer.batch_size=4",
    "trainer.eval_batch_size=8",
    "trainer.logging_steps=2",
    "trainer.precision=fp32",  # bf16 autocast on a tiny CPU model costs seconds of kernel set-up per shape
    "++sweep.trial={trainer.max_steps: 4, trainer.eval_every: 2, trainer.eval_subset: 8, "
    "trainer.exact_match_items: 0, trainer.final_eval: subset}",
]
HF_NOTES = [
    "SFTTrainer (TRL 1.16) takes no model_init argument: the trainer is built with model=model_init(None) "
    "(one extra model load) and trainer.model_init is set afterwards.",
    "Trainer.train replaces the model with model_init(trial), which lacks the fused LM head SFTTrainer adds in "
    "__init__; without trl.trainer.utils.add_fused_lm_head in model_init, training fails with AttributeError: "
    "'CausalLMOutputWithPast' object has no attribute 'log_probs'.",
    "Values hp_space returns that are not TrainingArguments fields (LoRA r, alpha, targets) are dropped with a "
    "warning; model_init(trial) runs before hp_space(trial), so it samples the LoRA values from the trial itself.",
    "The default compute_objective is not eval_loss with SFTTrainer: its evaluate() adds eval_entropy, "
    "eval_mean_token_accuracy, eval_num_tokens and eval_model_preparation_time, and the default sums those "
    "instead; compute_objective=lambda m: m['eval_loss'] is passed.",
    "optuna.create_study's default pruner (MedianPruner) applies, since transformers reports every eval to the "
    "trial; kwargs go to create_study, so optuna callbacks cannot be passed (a storage is, to read the trials).",
]


@dataclass
class Setup:
    """What every approach shares."""

    cfg: RunConfig  # composed once (lora_search runs recompose it with their own results_dir)
    overrides: list[str]  # the overrides that composed it
    base: RunConfig  # cfg with the sweep's short-trial budget applied
    folder: str  # the model's local safetensors folder
    work: Path  # scratch space for trainer outputs and lora_search's results
    trials: int
    precision: str  # the peers' precision: trl | fp32
    train_rows: int = 0
    eval_rows: int = 0


# ---- one trial as the guides write it ----

def train_once(setup: Setup, tcfg: RunConfig, data, out_dir: Path) -> dict:
    """One hand-written trial: load the model, wrap it with LoRA, build SFTTrainer, train, evaluate; timed."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTTrainer

    t0 = time.perf_counter()
    set_seed(tcfg.trainer.seed)
    model = AutoModelForCausalLM.from_pretrained(setup.folder)
    tokenizer = AutoTokenizer.from_pretrained(setup.folder)
    dtype = model.dtype
    model = get_peft_model(model, common.lora_config(tcfg))
    args = common.peer_sft_args(tcfg, out_dir, setup.precision)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                         processing_class=tokenizer, callbacks=[timer])
    evals = timed_evaluate(trainer)
    setup_s = time.perf_counter() - t0
    trainer.train()
    final = trainer.evaluate()
    row = {"setup_s": setup_s, "train_step_s": timer.seconds, "eval_s": evals["seconds"], "evals": evals["count"],
           "steps": trainer.state.global_step, "wall_s": time.perf_counter() - t0, "eval_loss": final["eval_loss"],
           "precision": common.precision_label(args, dtype)}
    trainer.accelerator.free_memory()
    del trainer, model
    gc.collect()
    return row


# ---- the three approaches ----

def run_handwritten(setup: Setup, index: int) -> dict:
    """(a) the hand-written recipe: a model load and full evals every trial, no pruning."""
    import optuna

    timings: dict[int, dict] = {}
    with common.Stopwatch() as total:
        data = load_task_data(setup.cfg.data)

        def objective(trial) -> float:
            params = common.sample(trial, setup.cfg)
            row = train_once(setup, common.trial_config(setup.base, params), data,
                             setup.work / f"handwritten-{index}" / f"{trial.number:04d}")
            timings[trial.number] = row
            log.info("handwritten trial %d: eval_loss %.4f (%.0f s)", trial.number, row["eval_loss"], row["wall_s"])
            return row["eval_loss"]

        study = optuna.create_study(direction=setup.cfg.sweep.direction, sampler=common.sampler(setup.cfg))
        with common.quiet_optuna():
            study.optimize(objective, n_trials=setup.trials)
    precision = next((r["precision"] for r in timings.values()), None)
    return common.summarize(total.seconds, study, timings, {
        "description": "per trial: from_pretrained + get_peft_model + SFTTrainer, evals of the whole eval set "
                       "every eval_every steps and a final trainer.evaluate(); no pruning",
        "model_loads": setup.trials, "pruner": "none", "precision": precision,
        "objective_on": f"whole eval set, {len(data.eval)} rows", "eval_rows": len(data.eval)})


def run_lora_search(setup: Setup, index: int) -> dict:
    """(ours) lora_search's search stage in this process; per-trial figures from its trial records."""
    cfg = load_config(setup.overrides + [f"results_dir={setup.work / f'lora_search-{index}'}"])
    with common.Stopwatch() as total:
        pipeline.run(cfg)
    study = study_lib.open_study(cfg)
    timings = {}
    for frozen in study.get_trials(deepcopy=False):
        m = records.read_json(study_lib.study_dir(cfg) / "trials" / f"{frozen.number:04d}" / "metrics.json") or {}
        parts = [m[k] for k in ("periodic_eval_s", "final_eval_s", "exact_match_s") if m.get(k) is not None]
        timings[frozen.number] = {"setup_s": m.get("setup_s"), "train_step_s": m.get("train_step_s"),
                                  "eval_s": sum(parts) if parts else None, "steps": m.get("steps"),
                                  "wall_s": m.get("wall_s"), "pruned_at_step": m.get("pruned_at_step")}
    base = common.trial_base(cfg)
    mode = hardware.precision(base.trainer.precision)
    precision = common.precision_label(SimpleNamespace(bf16=mode == "bf16", fp16=mode == "fp16"),
                                       hardware.model_dtype(base.model.dtype))
    subset = min(base.trainer.eval_subset, setup.eval_rows)
    return common.summarize(total.seconds, study, timings, {
        "description": "lora_search.commands.pipeline.run(stage=search): the base loaded once, a fresh adapter per trial, "
                       "evals of a fixed eval subset, pruning; wall time includes preflight, load and tokenization",
        "model_loads": 1, "pruner": common.spec(cfg.sweep.pruner), "precision": precision,
        "objective_on": f"fixed eval subset, {subset} rows", "eval_rows": subset})


class _TrainBegan(TrainerCallback):
    """Marks when training starts (after model_init, accelerator and optimizer set-up)."""

    def __init__(self):
        self.at = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.at = time.perf_counter()


def run_hf_search(setup: Setup, index: int) -> dict:
    """(b) transformers' Trainer.hyperparameter_search(backend="optuna") with a model_init that builds base + LoRA."""
    import optuna
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    timings: dict[int, dict] = {}
    dtypes = []
    with common.Stopwatch() as total:
        data = load_task_data(setup.cfg.data)
        tokenizer = AutoTokenizer.from_pretrained(setup.folder)

        def model_init(trial):
            params = common.sample(trial, setup.cfg) if trial is not None else {}
            model = AutoModelForCausalLM.from_pretrained(setup.folder)
            dtypes.append(model.dtype)
            peft_model = get_peft_model(model, common.lora_config(common.trial_config(setup.base, params)))
            if trial is not None:  # SFTTrainer.__init__ adds it to its first model only (see HF_NOTES)
                add_fused_lm_head(peft_model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
            return peft_model

        def hp_space(trial):
            return {"learning_rate": common.sample(trial, setup.cfg)["trainer.learning_rate"]}

        args = common.peer_sft_args(setup.base, setup.work / f"hf_search-{index}", setup.precision)
        timer, began = StepTimer(), _TrainBegan()
        trainer = SFTTrainer(model=model_init(None), args=args, train_dataset=data.train, eval_dataset=data.eval,
                             processing_class=tokenizer, callbacks=[timer, began])
        trainer.model_init = model_init
        evals = timed_evaluate(trainer)
        trainer.train = _timed_trials(trainer, trainer.train, timer, began, evals, timings)
        storage = optuna.storages.InMemoryStorage()
        with common.quiet_optuna():
            trainer.hyperparameter_search(hp_space=hp_space, compute_objective=lambda m: m["eval_loss"],
                                          n_trials=setup.trials, direction=setup.cfg.sweep.direction,
                                          backend="optuna", sampler=common.sampler(setup.cfg), storage=storage,
                                          study_name="hf_search")
    study = optuna.load_study(study_name="hf_search", storage=storage)
    return common.summarize(total.seconds, study, timings, {
        "description": "Trainer.hyperparameter_search(backend='optuna') on SFTTrainer; model_init(trial) loads "
                       "the model and attaches LoRA per trial; evals of the whole eval set every eval_every steps",
        "model_loads": setup.trials + 1, "pruner": "optuna.create_study default (MedianPruner)",
        "precision": common.precision_label(args, dtypes[0] if dtypes else None),
        "objective_on": f"whole eval set, {len(data.eval)} rows", "eval_rows": len(data.eval), "notes": HF_NOTES})


def _timed_trials(trainer, train, timer, began, evals, timings):
    """Wrap trainer.train (one call per trial) to record each trial's set-up, step, eval and wall seconds."""
    import optuna

    def timed_train(*args, trial=None, **kwargs):
        t0, steps0, eval0, count0 = time.perf_counter(), timer.seconds, evals["seconds"], evals["count"]
        began.at, pruned = None, False
        try:
            return train(*args, trial=trial, **kwargs)
        except optuna.TrialPruned:
            pruned = True
            raise
        finally:
            end = time.perf_counter()
            number = trial.number if trial is not None else -1
            timings[number] = {"setup_s": (began.at or end) - t0, "train_step_s": timer.seconds - steps0,
                               "eval_s": evals["seconds"] - eval0, "evals": evals["count"] - count0,
                               "steps": trainer.state.global_step, "wall_s": end - t0,
                               "pruned_at_step": trainer.state.global_step if pruned else None}
            log.info("hf_search trial %d: %s at step %d (%.0f s)", number, "pruned" if pruned else "done",
                     trainer.state.global_step, end - t0)

    return timed_train


# ---- figures ----

def quality(setup: Setup, approaches: dict) -> dict:
    """Train each approach's best configuration once more with the hand-written code (untimed) and
    evaluate it on the whole eval set; identical configurations are trained once."""
    data = load_task_data(setup.cfg.data)
    done: dict[str, float] = {}
    out = {}
    for name, result in approaches.items():
        params = result.get("best_params")
        if not params:
            continue
        key = json.dumps(params, sort_keys=True)
        if key not in done:
            row = train_once(setup, common.trial_config(setup.base, params), data,
                             setup.work / "quality" / f"{len(done):02d}")
            done[key] = row["eval_loss"]
            log.info("quality: %s's best config -> full eval loss %.4f", name, row["eval_loss"])
        out[name] = done[key]
        result["best_full_eval_loss"] = done[key]
    return out


def targets(approaches: dict) -> dict:
    """The issue's targets, reported (not asserted): lora_search wall <= 0.5x handwritten, best loss within 2%."""
    hand, ours, hf = (approaches.get(name, {}) for name in ("handwritten", "lora_search", "hf_search"))
    out: dict = {"wall_target_ratio": 0.5, "loss_target_pct": 2.0}
    if ours.get("wall_s") and hand.get("wall_s"):
        ratio = ours["wall_s"] / hand["wall_s"]
        out.update(lora_search_wall_vs_handwritten=round(ratio, 3), wall_met=ratio <= 0.5)
    if hf.get("wall_s") and hand.get("wall_s"):
        out["hf_search_wall_vs_handwritten"] = round(hf["wall_s"] / hand["wall_s"], 3)
    a, b = hand.get("best_full_eval_loss"), ours.get("best_full_eval_loss")
    if a and b is not None:
        gap = (b - a) / a * 100
        out.update(lora_search_best_loss_vs_handwritten_pct=round(gap, 2), loss_met=gap <= 2.0)
    return out


# ---- the run ----

def overrides(model: str, trials: int, quick: bool, cache_dir: str | None) -> list[str]:
    """The overrides every approach's config is composed from (lora_search adds its results_dir)."""
    out = [f"model={model}", "sweep=rank_lr", "stage=search", "tracking=none", f"sweep.n_trials={trials}"]
    if cache_dir:
        out.append(f"cache_dir={cache_dir}")
    return out + (QUICK if quick else [])


def settings(setup: Setup, repeats: int, quick: bool) -> dict:
    """What every approach ran with."""
    t = setup.base.trainer
    return {"model": setup.cfg.model.name, "trials": setup.trials, "max_steps": t.max_steps,
            "eval_every": t.eval_every, "batch_size": t.batch_size, "eval_batch_size": t.eval_batch_size,
            "max_length": t.max_length, "lr_scheduler": t.lr_scheduler, "warmup_steps": t.warmup_steps,
            "train_rows": setup.train_rows, "eval_rows": setup.eval_rows, "lora_search_eval_subset": t.eval_subset,
            "sampler": common.spec(setup.cfg.sweep.sampler), "space": dict(setup.cfg.sweep.space),
            "peer_precision": setup.precision, "repeats": repeats, "quick": quick,
            "torch_threads": common.torch_threads(), "overrides": setup.overrides}


def run(model: str = "smollm2_135m", trials: int = 8, out: Path | str | None = None, quick: bool = False,
        cache_dir: str | None = None, repeats: int = 1, peer_precision: str | None = None,
        threads: int | None = None) -> dict:
    """Run the three approaches, the quality re-runs, and write the record (results/bench/peer_sweep.json)."""
    peer_precision = peer_precision or ("fp32" if quick else "trl")
    runners = dict(zip(ORDER, (run_handwritten, run_lora_search, run_hf_search)))
    with common.threads(threads or (1 if quick else None)), common.Stopwatch() as total, \
            tempfile.TemporaryDirectory(prefix="peer_sweep-") as work:
        ovr = overrides(model, trials, quick, cache_dir)
        cfg = load_config(ovr + [f"results_dir={Path(work) / 'unused'}"])
        folder = loaders.local_copy(cfg.model, cfg.cache_dir)  # converted once, before anything is timed
        data = load_task_data(cfg.data)
        setup = Setup(cfg, ovr, common.trial_base(cfg), folder, Path(work), trials, peer_precision,
                      len(data.train), len(data.eval))
        approaches, order = common.alternate(runners, repeats, setup)
        log.info("== quality: each best configuration trained again with the hand-written code (untimed)")
        best_losses = quality(setup, approaches)
        result = common.record(NAME, {
            "model": cfg.model.name,
            "settings": settings(setup, repeats, quick),
            "order": order,
            "approaches": approaches,
            "quality": {"method": "each approach's best params trained again with the hand-written recipe "
                                  "(same code for all, untimed), eval_loss on the whole eval set",
                        "best_full_eval_loss": best_losses},
            "targets": targets(approaches),
        })
    result["wall_s"] = common.rounded(total.seconds)
    path = common.write_record(result, out)
    log.info("wrote %s", path)
    return result


def summary_lines(result: dict) -> list[str]:
    """A few lines for the console."""
    lines = []
    for name, a in result["approaches"].items():
        if "error" in a:
            lines.append(f"{name:12s} FAILED: {a['error']}")
            continue
        lines.append(f"{name:12s} wall {a['wall_s']:8.1f} s | {a['complete']} complete, {a['pruned']} pruned | "
                     f"own best {common.fmt(a.get('best_value'))} | "
                     f"full-eval best {common.fmt(a.get('best_full_eval_loss'))} | {a['precision']}")
    lines.append(f"targets: {json.dumps(result['targets'])}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run, print a summary; return the record."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model config group (default smollm2_135m; tiny_llama with --quick)")
    p.add_argument("--trials", type=int, default=None, help="trials per approach (default 8; 2 with --quick)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the three approaches this many times, alternating their order")
    p.add_argument("--peer-precision", choices=common.PEER_PRECISIONS, default=None,
                   help="the peers' precision: trl = SFTConfig defaults (bf16 mixed; the default), "
                        "fp32 = bf16/fp16 off (the default with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every approach (default torch's own; 1 with --quick)")
    p.add_argument("--cache-dir", default=None, help="where converted models live (default ~/.cache/lora_search)")
    p.add_argument("--out", default=None, help="the record (default results/bench/peer_sweep.json; "
                                               "results/bench-quick/peer_sweep.json with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for tests: tiny model, 2 trials of 4 steps, tiny data, fp32, 1 thread")
    a = p.parse_args(argv)
    common.configure_logging()
    out = a.out or (ROOT / "results" / "bench-quick" / f"{NAME}.json" if a.quick else common.bench_path(NAME))
    result = run(model=a.model or ("tiny_llama" if a.quick else "smollm2_135m"),
                 trials=a.trials or (2 if a.quick else 8), out=out, quick=a.quick, cache_dir=a.cache_dir,
                 repeats=a.repeats, peer_precision=a.peer_precision, threads=a.threads)
    print("\n".join(summary_lines(result)))
    return result


if __name__ == "__main__":
    main()
