"""The search space's checks: every entry a known key with a valid distribution, not a key a trial cannot change, no
LoRA init that rewrites the shared base; and the space's corners, which the sweep checks validate as configs.
"""

from __future__ import annotations

from typing import Any

from lora_search.config import compose
from lora_search.config.schema import RunConfig

DIST_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


NOT_PER_TRIAL = {
    "sweep.": "the study's own settings are fixed for the whole study",
    "tracking.": "it sets how trials are logged, not what they train",
    "benchmark.": "the benchmark stage reads it after the search; no trial does",
    "dashboard.": "only the dashboard command reads it",
    "trainer.method": "the data decides it (preference pairs train with trainer=dpo, prompt/completion rows with "
                      "trainer=sft)",
    "stage": "it is set for the whole run", "force": "it is set for the whole run",
    "worker": "it is set for the whole run", "run_name": "it is set for the whole run",
    "results_dir": "it is set for the whole run", "cache_dir": "it is set for the whole run",
}


BASE_REWRITING = ("pissa", "olora", "loftq", "corda", "eva")


def check_distribution(key: str, dist: Any) -> list[str]:
    """Problems with one space entry's distribution."""
    where = f"sweep.space.{key}"
    if not isinstance(dist, dict) or dist.get("type") not in DIST_FIELDS:
        got = dist.get("type") if isinstance(dist, dict) else dist
        return [f"{where} must be a distribution with type float, int or categorical; got {got!r}"]
    kind = dist["type"]
    problems = []
    extra = set(dist) - DIST_FIELDS[kind]
    if extra:
        problems.append(f"{where}: unknown field(s) {', '.join(sorted(extra))} for type {kind}; "
                        f"accepted: {', '.join(sorted(DIST_FIELDS[kind]))}")
    if kind == "categorical":
        choices = dist.get("choices")
        if not isinstance(choices, list) or not choices:
            problems.append(f"{where}.choices must be a non-empty list, got {choices!r}")
        return problems
    low, high = dist.get("low"), dist.get("high")
    number = (int,) if kind == "int" else (int, float)
    if not isinstance(low, number) or not isinstance(high, number) or isinstance(low, bool):
        return problems + [f"{where} needs numeric low and high, got low={low!r} high={high!r}"]
    if not low < high:
        problems.append(f"{where}: low must be below high, got low={low!r} high={high!r}")
    if dist.get("log") and low <= 0:
        problems.append(f"{where}: a log scale needs low > 0, got {low!r}")
    if dist.get("log") and dist.get("step"):
        problems.append(f"{where}: log and step cannot be combined")
    return problems


def corners(space: dict) -> list[dict]:
    """For each key, its extreme values (low, high, every choice): what validation must accept."""
    out = []
    for key, dist in space.items():
        values = dist["choices"] if dist["type"] == "categorical" else [dist["low"], dist["high"]]
        out.extend({key: v} for v in values)
    return out


def not_per_trial(key: str) -> str | None:
    """Why a dotted key can never take effect in a trial, or None."""
    for prefix, why in NOT_PER_TRIAL.items():
        if key == prefix.rstrip(".") or (prefix.endswith(".") and key.startswith(prefix)):
            return f"sweep.space: {key} cannot be swept: {why}; set it on the command line for the whole run"
    return None


def rewrites_base(init) -> bool:
    """Whether a lora.init_lora_weights value rewrites the base model's weights (or needs EVA's data pass)."""
    return isinstance(init, str) and (init in BASE_REWRITING or init.startswith(("pissa_niter_", "corda")))


def check_space(space: dict) -> list[str]:
    """Problems with the search space: unknown keys (with the closest ones), keys no trial can act on, bad
    distributions."""
    if not space:
        return ["sweep.space is empty: every trial would train the same configuration; name at least one config "
                "key to search, e.g. lora.r: {type: categorical, choices: [8, 16]} (one configuration: stage=train)"]
    problems = []
    for key, dist in space.items():
        key_problem = compose.check_key(key) or not_per_trial(key)
        if key_problem:
            problems.append(key_problem if key_problem.startswith("sweep.space") else f"sweep.space: {key_problem}")
            continue
        problems.extend(check_distribution(key, dist))
    return problems


def check_inits(cfg: RunConfig) -> list[str]:
    """Refuse LoRA inits that rewrite the shared base, wherever a sweep could take one from: the composed lora,
    sweep.trial, the space, sweep.enqueue, sweep.promotion."""
    s = cfg.sweep
    found = {"the composed config (lora=... or lora.init_lora_weights=...)": cfg.lora.init_lora_weights,
             "sweep.trial": s.trial.get("lora.init_lora_weights"), "sweep.promotion": s.promotion.get("lora.init_lora_weights")}
    dist = s.space.get("lora.init_lora_weights")
    for value in dist.get("choices") or () if isinstance(dist, dict) else ():
        found.setdefault(f"sweep.space (choice {value!r})", value)
    for i, entry in enumerate(s.enqueue):
        found[f"sweep.enqueue[{i}]"] = dict(entry).get("lora.init_lora_weights")
    return [f"lora.init_lora_weights={value} from {where} rewrites the base model's weights, which every trial of "
            "a sweep shares (eva: needs a data pass trials do not run); sweeps accept true, false, gaussian, "
            "orthogonal (stage=train accepts it)" for where, value in found.items() if rewrites_base(value)]
