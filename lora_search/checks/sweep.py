"""The sweep file's checks: every problem with the space, the objective(s), the sampler and pruner, the memory
budget and the trainer they go with, listed together before anything trains (study.check_sweep).
"""

from __future__ import annotations

import difflib

from lora_search.checks import space as space_checks
from lora_search.checks import sweep_settings
from lora_search.checks.run_config import validate
from lora_search.config import objectives, samplers
from lora_search.config import space as space_lib
from lora_search.config.promotion_settings import SETTINGS
from lora_search.config.schema import (
    GENERATION_METRICS,
    METRIC_DIRECTIONS,
    PREFERENCE_METRICS,
    QUALITY_METRICS,
    RunConfig,
)
from lora_search.core.errors import ConfigError
from lora_search.data import preference_pairs
from lora_search.models.adapters import FIXED_BY_START

METRICS = QUALITY_METRICS + ("train_tokens_per_s",)  # what sweep.metric accepts alone; costs go in sweep.objectives


def check_sweep(cfg: RunConfig) -> None:
    """Every problem with the sweep file, raised once, before anything trains."""
    s = cfg.sweep
    problems = space_checks.check_space(s.space) + space_checks.check_inits(cfg) + sweep_settings.max_failures_problems(s) + sweep_settings.objective_problems(s) + \
        sweep_settings.memory_budget_problems(s)
    own = METRIC_DIRECTIONS.get(s.metric)
    if s.objectives:
        if s.nightly.enabled:
            problems.append("sweep.nightly crowns a champion by one metric; sweep.objectives names "
                            f"{len(s.objectives)}: a nightly study takes sweep.metric alone")
    elif s.direction not in ("minimize", "maximize", "auto"):
        problems.append(f"sweep.direction must be auto (the metric's), minimize or maximize; got {s.direction!r}")
    elif own and s.direction not in (own, "auto"):
        problems.append(f"sweep.direction={s.direction} contradicts sweep.metric={s.metric}, which is {own[:-1]}ed; "
                        f"leave sweep.direction out (auto) or set it to {own}")
    if not s.objectives and s.metric in METRIC_DIRECTIONS and s.metric not in METRICS:
        problems.append(f"sweep.metric={s.metric} is a cost: alone it would favour an adapter that learns nothing; "
                        f"name it with a quality metric in sweep.objectives, e.g. sweep.objectives=[eval_loss,{s.metric}]")
    elif not s.objectives and s.metric not in METRICS:
        close = difflib.get_close_matches(str(s.metric), METRICS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"sweep.metric must be one of {', '.join(METRICS)}; got {s.metric!r}{hint}")
    problems += _method_problems(cfg) + _generation_problems(cfg) + sweep_settings.sampler_problems(cfg, len(s.objectives) or 1)
    generated = [m for m, _ in objective_list(cfg) if m in GENERATION_METRICS]
    items = s.trial.get("trainer.exact_match_items", s.exact_match_items)
    if generated and not (isinstance(items, int) and items > 0):
        where = "sweep.trial's trainer.exact_match_items" if "trainer.exact_match_items" in s.trial else \
            "sweep.exact_match_items"
        problems.append(f"sweep.metric={generated[0]} needs eval items answered in every trial; {where} is {items!r} "
                        "(a positive integer: sweep.exact_match_items, default 16)")
    if not isinstance(s.n_trials, int) or s.n_trials < 1:
        problems.append(f"sweep.n_trials must be a positive integer, got {s.n_trials!r}")
    if s.nightly.enabled:
        problems.extend(sweep_settings.nightly_problems(s.nightly))
    if s.timeout_s is not None and s.timeout_s <= 0:
        problems.append(f"sweep.timeout_s must be positive or null, got {s.timeout_s!r}")
    if not isinstance(s.heartbeat_s, int) or isinstance(s.heartbeat_s, bool) or s.heartbeat_s < 1:
        problems.append(f"sweep.heartbeat_s must be a positive integer (seconds between a worker's heartbeats), "
                        f"got {s.heartbeat_s!r}")
    for part in ("trial", "promotion"):
        problems.extend(f"sweep.{part}: {p}" for k in getattr(s, part)
                        if k not in SETTINGS or part != "promotion" if (p := space_lib.compose.check_key(k)))
    problems.extend(sweep_settings.promotion_problems(s.promotion))
    for entry in s.enqueue:
        problems.extend(f"sweep.enqueue: {p}" for k in entry if (p := space_lib.compose.check_key(k)))
    if problems:
        raise ConfigError(problems)
    for maker in (samplers.make_sampler, samplers.make_pruner):
        maker(cfg)
    trial_cfg = space_lib.trial_base(cfg)
    for corner in space_checks.corners(s.space) + [dict(e) for e in s.enqueue]:
        try:
            validate(space_lib.apply(trial_cfg, corner))
        except ConfigError as e:
            problems.extend(f"sweep.space allows {k}={v!r}, which is invalid: {p}" for k, v in corner.items()
                            for p in e.problems)
    if problems:
        raise ConfigError(sorted(set(problems)))


def _method_problems(cfg: RunConfig) -> list[str]:
    """The objective and the space against the trainer: preference metrics need dpo, perplexity needs sft, and a
    starting adapter fixes the LoRA structure."""
    s = cfg.sweep
    try:
        t = space_lib.trial_base(cfg).trainer
    except ConfigError:  # a bad key in sweep.trial: check_sweep reports it
        return []
    problems = []
    names = [m for m, _ in objective_list(cfg)]
    for metric in [m for m in names if m in PREFERENCE_METRICS and t.method != "dpo"]:
        problems.append(f"sweep.metric={metric} is measured on preference pairs by trainer=dpo; this sweep trains "
                        f"with trainer={t.method} (use eval_loss, perplexity, exact_match, rouge_l or bleu)")
    scaling = [k for k in s.space if k in ("trainer.beta", "trainer.loss_type", "trainer.label_smoothing")]
    if "eval_loss" in names and t.method == "dpo" and scaling:
        problems.append(f"sweep.metric=eval_loss compares DPO losses, which {', '.join(scaling)} rescale(s): trials "
                        "are not comparable on it; use sweep.metric=preference_accuracy or reward_accuracy")
    rl = t.method in ("grpo", "rloo")
    if "reward" in names and not rl:
        problems.append(f"sweep.metric=reward is the held-out reward of greedy answers, measured by trainer=grpo or "
                        f"rloo; this sweep trains with trainer={t.method}")
    for metric in [m for m in names if rl and m in ("eval_loss", "perplexity")]:
        problems.append(f"sweep.metric={metric} is not measured by trainer={t.method} (an RL loss says nothing of "
                        "quality); use reward (the held-out reward of greedy answers) or exact_match")
    if "perplexity" in names and t.method == "dpo":
        problems.append("sweep.metric=perplexity is not measured by trainer=dpo; use eval_loss (the DPO loss), "
                        f"{', '.join(PREFERENCE_METRICS)}")
    if t.init_adapter:
        fixed = [k for k in s.space if k in FIXED_BY_START]
        if fixed:
            problems.append(f"sweep.space: {', '.join(fixed)} cannot be swept with trainer.init_adapter="
                            f"{t.init_adapter}: the starting adapter fixes its rank, scaling and targets; sweep "
                            "lora.dropout, trainer.* keys (beta, learning_rate, ...) or leave init_adapter out")
    return problems


def _generation_problems(cfg: RunConfig) -> list[str]:
    """Generation metrics score greedy answers against reference answers: preference pairs have none, and exact
    match needs exact ones (data.exact_match)."""
    try:
        method = space_lib.trial_base(cfg).trainer.method
    except ConfigError:  # a bad key in sweep.trial: check_sweep reports it
        method = cfg.trainer.method
    problems = []
    for metric in [m for m, _ in objective_list(cfg) if m in GENERATION_METRICS]:
        if method == "dpo" or preference_pairs.is_pairs(cfg.data.layout, cfg.data):
            problems.append(f"sweep.metric={metric} scores generated answers against reference answers, which "
                            f"preference pairs (trainer=dpo, data={cfg.data.name}) do not have; use one of "
                            f"{', '.join(PREFERENCE_METRICS)}")
        elif metric == "exact_match" and not cfg.data.exact_match:
            problems.append(f"sweep.metric=exact_match needs data with exact answers (data.exact_match), "
                            f"data={cfg.data.name}; for free-text answers use sweep.metric=rouge_l or bleu")
    return problems


def objective_list(cfg: RunConfig) -> list[tuple[str, str]]:
    """The study's (metric, direction) pairs: sweep.objectives, or sweep.metric alone."""
    return objectives.objectives(cfg.sweep)
