"""The reward functions an RL run (trainer=grpo, trainer=rloo) scores its samples with, named in `trainer.rewards`.

A reward is a built-in name (REWARDS) or `module:function` on the Python path, a function with TRL's reward signature:
it is called with keyword arguments `prompts` (the prompts, message lists or strings), `completions` (one per
sampled answer: `[{"role": "assistant", "content": text}]` for chat data, else the text), `completion_ids` (their
token ids), every other column of the data as a list (`answer`: the row's reference answer), `trainer_state`
(transformers' TrainerState; None on held-out prompts), `log_extra` and `log_metric` (TRL's logging hooks), and
returns one float per completion (None: no score for that one). So a user reward is written
`def my_reward(prompts, completions, answer, **kwargs) -> list[float]`; it must take `**kwargs`.

Every reward is wrapped by `checked`: a reward that returns the wrong number of scores, or a NaN, an infinity or a
non-number, raises RewardError, which fails the trial with that reason.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable

from lora_search.train.evaluate import normalize

# What TRL passes every reward besides the data's columns (a user reward must accept them, through **kwargs)
PASSED = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
RL_COLUMNS = ("answer",)  # the columns an RL run's data gives its rewards (data/load: the reference answer)


class RewardError(ValueError):
    """A reward returned something TRL cannot train on (the wrong count, NaN, not a number)."""


def text(completion) -> str:
    """A completion's text: the last message's content for chat data, else the string itself."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return str(completion)


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """1 where the answer equals the reference after normalize() (whitespace, a trailing period), else 0."""
    return [float(normalize(text(c)) == normalize(a)) for c, a in zip(completions, answer)]


def contains(prompts, completions, answer, **kwargs) -> list[float]:
    """Partial credit: 1 for the exact answer, 0.5 when the reference appears inside a longer answer, else 0."""
    scores = []
    for c, a in zip(completions, answer):
        got, want = normalize(text(c)), normalize(a)
        scores.append(1.0 if got == want else 0.5 if want and want in got else 0.0)
    return scores


def answer_format(prompts, completions, answer, **kwargs) -> list[float]:
    """1 for a bare answer: one line, no more words than the reference, no sentence-ending period; else 0."""
    out = []
    for c, a in zip(completions, answer):
        got = text(c).strip()
        out.append(float(bool(got) and "\n" not in got and len(got.split()) <= len(a.split())
                          and not got.endswith(".")))
    return out


REWARDS: dict[str, Callable] = {"exact_match": exact_match, "contains": contains, "format": answer_format}


def _import(spec: str) -> Callable:
    """The function a `module:function` spec names (ImportError / AttributeError as raised)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def problem(spec) -> str | None:
    """What is wrong with one trainer.rewards entry (not built in, not importable, not TRL's signature), or None."""
    if not isinstance(spec, str) or not spec:
        return f"trainer.rewards entries must be names, got {spec!r}"
    if spec in REWARDS:
        return None
    accepted = f"a built-in reward ({', '.join(REWARDS)}) or module:function on the Python path"
    if ":" not in spec:
        return f"trainer.rewards: unknown reward {spec!r}; a reward is {accepted}"
    try:
        fn = _import(spec)
    except Exception as e:  # the user's module may raise anything while it is imported
        return f"trainer.rewards: cannot import {spec!r} ({type(e).__name__}: {e}); a reward is {accepted}"
    if not callable(fn):
        return f"trainer.rewards: {spec!r} is not a function"
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None  # a builtin or C function: TRL will tell
    kinds = {p.kind for p in params}
    required = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [n for n in required if n not in PASSED + RL_COLUMNS]
    if inspect.Parameter.VAR_KEYWORD not in kinds or unknown or inspect.Parameter.POSITIONAL_ONLY in kinds:
        return (f"trainer.rewards: {spec} has the signature {fn.__name__}{inspect.signature(fn)}; a reward takes "
                "TRL's keyword arguments: (prompts, completions, **kwargs), where kwargs holds completion_ids, "
                "answer and trainer_state")
    return None


def checked(fn: Callable, name: str) -> Callable:
    """fn, raising RewardError when it returns the wrong number of scores or one that is NaN, infinite or not a
    number (None is TRL's 'no score' and passes)."""
    def reward(prompts, completions, **kwargs):
        scores = fn(prompts=prompts, completions=completions, **kwargs)
        try:
            scores = list(scores)
        except TypeError:
            raise RewardError(f"reward {name} returned {scores!r}, not a list of scores") from None
        if len(scores) != len(completions):
            raise RewardError(f"reward {name} returned {len(scores)} scores for {len(completions)} completions")
        for i, s in enumerate(scores):
            if s is None:
                continue
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise RewardError(f"reward {name} returned {s!r} for completion {i}: a reward must be a finite number")
        return scores

    reward.__name__ = name.replace(":", ".").replace(".", "_")  # TRL logs rewards/<name>/mean
    return reward


def resolve(specs: list[str]) -> list[Callable]:
    """The checked reward functions trainer.rewards names, in order."""
    return [checked(REWARDS[s] if s in REWARDS else _import(s), s) for s in specs]


def weights(specs: list[str], given: list[float]) -> list[float]:
    """The reward weights: trainer.reward_weights, or 1 for each reward."""
    return [float(w) for w in given] if given else [1.0] * len(specs)


def score(funcs: list[Callable], weight: list[float], prompts, completions, columns: dict, **passed) -> list[float]:
    """Each completion's weighted total reward (None scores count 0, as TRL's nansum does)."""
    totals = [0.0] * len(completions)
    for fn, w in zip(funcs, weight):
        for i, s in enumerate(fn(prompts=prompts, completions=completions, **columns, **passed)):
            totals[i] += w * (s or 0.0)
    return totals
