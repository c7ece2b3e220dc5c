"""trainer=grpo and trainer=rloo: TRL's online RL trainers (GRPOTrainer, RLOOTrainer) on the worker's shared base,
rewarded by the functions `trainer.rewards` names (train/rewards.py).

Each step samples `trainer.num_generations` completions per prompt (at `trainer.temperature`, at most
`trainer.max_new_tokens` tokens), scores them, and moves the adapter toward the better ones of each group under a
clipped probability ratio (`trainer.epsilon`, `trainer.epsilon_high`) and a KL penalty to the reference
(`trainer.beta`; 0: none). The reference is the base with the adapter disabled: TRL copies an existing adapter to a
frozen "ref" adapter, which is removed again for a fresh one (as for DPO, dpo.settle_reference); with
`trainer.init_adapter` that copy is the reference (SFT, then RL). No second copy of the base is made.

The trainer's evaluations answer held-out prompts greedily and score the answers with the same rewards
(`eval_reward`, which pruning reads, and `eval_exact_match`); the run records TRL's training curves (reward and
its spread, KL, clip fraction, entropy, completion length) and stops as diverged when the KL runs past
`trainer.max_kl` or the reward falls `trainer.max_reward_drop` below its best.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainerCallback

from lora_search.config.schema import RunConfig
from lora_search.train import dpo, evaluate, rewards
from lora_search.train.pruning import PruningCallback
from lora_search.train.sft import common_arguments

METHODS = ("grpo", "rloo")
# TRL's per-step logs -> this project's names: the run's curves (metrics "rl_history") and their summaries
CURVES = {"reward": "reward", "reward_std": "reward_std", "kl": "kl", "clip_ratio/region_mean": "clip_fraction",
          "entropy": "entropy", "completions/mean_length": "completion_length", "frac_reward_zero_std":
          "frac_reward_zero_std", "loss": "loss"}


def rl_config(cfg: RunConfig, out_dir: Path, report_to: list[str]):
    """TRL's GRPOConfig or RLOOConfig for a run config (batch_size counts completions, num_generations to a
    prompt)."""
    from trl import GRPOConfig, RLOOConfig

    t = cfg.trainer
    extra = {"loss_type": t.loss_type} if t.method == "grpo" else {}
    config = GRPOConfig if t.method == "grpo" else RLOOConfig
    return config(**common_arguments(cfg, out_dir, report_to), beta=t.beta, epsilon=t.epsilon,
                  epsilon_high=t.epsilon_high, num_generations=t.num_generations, num_generations_eval=1,
                  temperature=t.temperature, num_iterations=t.num_iterations, max_completion_length=t.max_new_tokens,
                  reward_weights=rewards.weights(t.rewards, t.reward_weights), log_completions=False, **extra)


def data_key(cfg: RunConfig) -> tuple:
    """What an RL run's data rows depend on (TRL tokenizes prompts as it samples)."""
    return "rl", repr(cfg.data)


def _rows(dataset):
    """Prompt and reference answer (the completion's text) of each row: what the trainer samples and rewards read."""
    return dataset.map(lambda row: {"answer": rewards.text(row["completion"])},
                       remove_columns=[c for c in dataset.column_names if c != "prompt"])


def make_trainer(worker, peft_model, cfg: RunConfig, out_dir: Path, report_to: list[str], callbacks, fresh: bool):
    """A GRPOTrainer or RLOOTrainer on the worker's data, its evaluations greedy answers to the fixed eval subset
    scored by the rewards; returns (trainer, the full eval set). fresh: the reference is the adapter-disabled base."""
    from trl import GRPOTrainer, RLOOTrainer

    key = data_key(cfg)
    if key not in worker.tokenized:
        worker.tokenized[key] = (_rows(worker.data.train), _rows(worker.data.eval))
    train, full_eval = worker.tokenized[key]
    funcs = rewards.resolve(list(cfg.trainer.rewards))
    watch = DivergenceWatch(cfg.trainer.max_kl, cfg.trainer.max_reward_drop)
    for cb in callbacks:
        if isinstance(cb, PruningCallback):
            cb.read("eval_reward")  # the held-out reward, not the RL loss
    trainer_cls = GRPOTrainer if cfg.trainer.method == "grpo" else RLOOTrainer
    trainer = trainer_cls(model=peft_model, reward_funcs=funcs, args=rl_config(cfg, out_dir, report_to),
                          train_dataset=train, eval_dataset=full_eval, processing_class=worker.base.tokenizer,
                          callbacks=[watch, *callbacks])
    dpo.settle_reference(peft_model, fresh)
    trainer.eval_dataset = full_eval.select(range(min(cfg.trainer.eval_subset, len(full_eval))))
    trainer.divergence = watch
    trainer.evaluate = _greedy_evaluate(trainer, cfg, funcs)
    return trainer, full_eval


def heldout(model, tokenizer, cfg: RunConfig, rows, funcs=None, state=None) -> dict:
    """Greedy answers to rows' prompts scored by the run's rewards (reward: the mean weighted total, reward_std its
    spread) and against their answers (evaluate.score: exact match, ROUGE-L, BLEU)."""
    funcs = funcs or rewards.resolve(list(cfg.trainer.rewards))
    prompts, answers = list(rows["prompt"]), list(rows["answer"])
    scores = evaluate.score(model, tokenizer, prompts, answers, cfg.trainer.max_new_tokens, cfg.trainer.eval_batch_size)
    texts = scores.pop("answers")
    chat = bool(prompts) and isinstance(prompts[0], list)
    completions = [[{"role": "assistant", "content": a}] for a in texts] if chat else texts
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in texts]
    totals = rewards.score(funcs, rewards.weights(cfg.trainer.rewards, cfg.trainer.reward_weights), prompts,
                           completions, {"answer": answers}, completion_ids=ids, trainer_state=state,
                           log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
    mean = sum(totals) / len(totals) if totals else math.nan
    spread = math.sqrt(sum((x - mean) ** 2 for x in totals) / len(totals)) if totals else math.nan
    kl = heldout_kl(model, tokenizer, prompts, texts, cfg.trainer.temperature)
    return {**scores, "reward": mean, "reward_std": spread, "kl": kl}


def heldout_kl(model, tokenizer, prompts, answers: list[str], temperature: float = 1.0) -> float | None:
    """The mean per-token KL(policy || reference) over the answer tokens of prompt + answer rows, both at the sampling
    temperature (what the KL penalty compares), summed over the vocabulary (not TRL's sampled estimate). The reference
    is the "ref" adapter when there is one, else the base with the adapter disabled; None without an adapter."""
    import torch
    from trl.trainer.utils import use_adapter

    if not hasattr(model, "peft_config"):
        return None
    chat = bool(prompts) and isinstance(prompts[0], list)
    device, was_training, kls = next(model.parameters()).device, model.training, []
    model.eval()
    try:
        with torch.inference_mode():
            for text, answer in zip(evaluate.prompt_texts(tokenizer, prompts), answers):
                head = tokenizer(text, add_special_tokens=not chat)["input_ids"]
                tail = tokenizer(answer, add_special_tokens=False)["input_ids"]
                if not tail:
                    continue
                ids = torch.tensor([head + tail], device=device)
                policy = (model(input_ids=ids).logits[0, len(head) - 1:-1].float() / temperature).log_softmax(-1)
                with use_adapter(model, "ref" if "ref" in model.peft_config else None):
                    ref = (model(input_ids=ids).logits[0, len(head) - 1:-1].float() / temperature).log_softmax(-1)
                kls.append(float((policy.exp() * (policy - ref)).sum(-1).mean()))
    finally:
        model.train(was_training)
    return sum(kls) / len(kls) if kls else None


def heldout_items(model, worker, cfg: RunConfig, n: int) -> dict:
    """heldout() on the first n eval rows of the worker's data."""
    rows = worker.tokenized[data_key(cfg)][1]
    return heldout(model, worker.base.tokenizer, cfg, rows.select(range(min(n, len(rows)))))


def _greedy_evaluate(trainer, cfg: RunConfig, funcs):
    """trainer.evaluate for an RL run: held-out greedy answers scored, logged and passed to the callbacks
    (pruning reads eval_reward) as transformers' evaluate would."""
    from transformers import Trainer

    def evaluate_(eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        rows = eval_dataset if eval_dataset is not None else trainer.eval_dataset
        scores = heldout(trainer.model, trainer.processing_class, cfg, rows, funcs, trainer.state)
        metrics = {f"{metric_key_prefix}_{k}": scores[k] for k in ("reward", "reward_std", "exact_match", "kl")}
        Trainer.log(trainer, dict(metrics))  # not TRL's log: it would take the training metrics it holds
        trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
        return metrics

    return evaluate_


class DivergenceWatch(TrainerCallback):
    """Stops training when the logged KL passes max_kl (or is not finite), or the reward, averaged over the last
    `window` logged steps, falls max_reward_drop below the best such average; `reason` says which and when. (A single
    step's reward is too noisy to read: with 2 prompts a step, SmolLM2's went 0.81, 0.62, 0.25 while it learned.)"""

    def __init__(self, max_kl: float | None, max_reward_drop: float | None, window: int = 5):
        self.max_kl, self.max_drop, self.window = max_kl, max_reward_drop, window
        self.best, self.reason, self.recent = None, None, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs, step = logs or {}, state.global_step
        kl, reward = logs.get("kl"), logs.get("reward")
        if self.reason is None and kl is not None and (not math.isfinite(kl) or self.max_kl is not None and
                                                       kl > self.max_kl):
            self.reason = f"diverged: KL to the reference {kl:.4g} at step {step} (trainer.max_kl={self.max_kl})"
        if self.reason is None and reward is not None:
            self.recent = [*self.recent, reward][-self.window:]
            mean = sum(self.recent) / len(self.recent)
            if len(self.recent) == self.window:
                self.best = mean if self.best is None else max(self.best, mean)
            if self.max_drop is not None and self.best is not None and self.best - mean > self.max_drop:
                self.reason = (f"diverged: reward collapsed to {mean:.4g} (mean of the last {self.window} steps) "
                               f"at step {step} from its best {self.best:.4g} "
                               f"(trainer.max_reward_drop={self.max_drop})")
        if self.reason:
            control.should_training_stop = True


def run_metrics(trainer, held: dict) -> dict:
    """An RL run's record: TRL's per-step curves (rl_history) and their summaries (reward first/last, KL last/max,
    clip fraction, entropy, completion length), the held-out greedy reward, and why it diverged (or None)."""
    history = [{"step": e.get("step"), **{name: e[k] for k, name in CURVES.items() if k in e}}
               for e in trainer.state.log_history if "reward" in e]
    out = {"rl_history": history, "reward": held.get("reward"), "reward_std": held.get("reward_std"),
           "kl": held.get("kl"), "rl_diverged": trainer.divergence.reason}
    for name in ("reward", "reward_std", "kl", "clip_fraction", "entropy", "completion_length"):
        values = [h[name] for h in history if h.get(name) is not None and math.isfinite(h[name])]
        out[f"train_{name}_first"] = values[0] if values else None
        out[f"train_{name}_last"] = values[-1] if values else None
        out[f"train_{name}_mean"] = sum(values) / len(values) if values else None
    kls = [h["kl"] for h in history if h.get("kl") is not None]
    out["train_kl_max"] = max(kls) if kls else None
    return out
