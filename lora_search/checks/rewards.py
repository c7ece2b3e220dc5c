"""trainer=grpo and trainer=rloo: their settings and the rewards they name, checked before any weight loads (each
reward importable, with TRL's signature; num_generations dividing the batch that is sampled at once)."""

from __future__ import annotations

import math

from lora_search.config.schema import RunConfig
from lora_search.train import rewards

# TRL 1.16 GRPOTrainer's loss types offered here (luspo and vespo need sequence-level importance sampling settings)
GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rl(problems: list[str], cfg: RunConfig) -> None:
    """beta, clip range, generations per prompt against the batch, temperature, iterations, loss type, rewards and
    their weights, divergence limits."""
    t = cfg.trainer
    if not _number(t.beta) or t.beta < 0:
        problems.append(f"trainer.beta must be a number >= 0 (the KL penalty's coefficient; 0: none), got {t.beta!r}")
    if not _number(t.epsilon) or not 0 < t.epsilon < 1:
        problems.append(f"trainer.epsilon must be in (0, 1) (the clip range of the probability ratio), "
                        f"got {t.epsilon!r}")
    if t.epsilon_high is not None and (not _number(t.epsilon_high) or t.epsilon_high <= 0):
        problems.append(f"trainer.epsilon_high must be a positive number or null, got {t.epsilon_high!r}")
    n, batch = t.num_generations, t.batch_size * t.gradient_accumulation_steps
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        problems.append(f"trainer.num_generations must be an integer >= 2 (answers compared per prompt), got {n!r}")
    elif isinstance(batch, int) and batch % n:
        problems.append(f"trainer.num_generations={n} must divide the answers sampled at once, trainer.batch_size x "
                        f"trainer.gradient_accumulation_steps = {batch} (each prompt's answers are one group)")
    if not _number(t.temperature) or t.temperature <= 0:
        problems.append(f"trainer.temperature must be a positive number, got {t.temperature!r}")
    if not isinstance(t.num_iterations, int) or isinstance(t.num_iterations, bool) or t.num_iterations < 1:
        problems.append(f"trainer.num_iterations must be a positive integer, got {t.num_iterations!r}")
    if t.method == "grpo" and t.loss_type not in GRPO_LOSSES:
        problems.append(f"trainer.loss_type must be one of {', '.join(GRPO_LOSSES)} with trainer=grpo; "
                        f"got {t.loss_type!r}")
    if t.method == "rloo" and t.loss_type != "rloo":
        problems.append(f"trainer=rloo has one loss (REINFORCE leave-one-out); trainer.loss_type must be rloo, "
                        f"got {t.loss_type!r}")
    if not t.rewards:
        problems.append(f"trainer.rewards must name at least one reward ({', '.join(rewards.REWARDS)} or "
                        "module:function)")
    problems.extend(p for spec in t.rewards if (p := rewards.problem(spec)))
    if t.reward_weights and len(t.reward_weights) != len(t.rewards):
        problems.append(f"trainer.reward_weights has {len(t.reward_weights)} weight(s) for {len(t.rewards)} "
                        f"reward(s) ({', '.join(map(str, t.rewards))}); give one per reward, or none (1 each)")
    elif not all(_number(w) for w in t.reward_weights):
        problems.append(f"trainer.reward_weights must be numbers, got {list(t.reward_weights)!r}")
    for key in ("max_kl", "max_reward_drop"):
        value = getattr(t, key)
        if value is not None and (not _number(value) or value <= 0):
            problems.append(f"trainer.{key} must be a positive number or null (never), got {value!r}")
