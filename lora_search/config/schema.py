"""Typed schemas for every config group, registered with Hydra's ConfigStore.

`conf/config.yaml` starts its defaults list with `run_schema`, so every group file is merged
into these dataclasses: a key that is not declared here, or a value of the wrong type, is
rejected by Hydra at composition. Range and cross-field checks live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    name: str = "model"  # short name, used in run names and reports
    source: str = "hub"  # embedded (GGUF shipped in a wheel) | tiny (built from a config) | hub | local
    path: Optional[str] = None  # hub id (source=hub) or folder (source=local)
    revision: Optional[str] = None  # hub revision (commit, tag or branch)
    gguf_package: Optional[str] = None  # source=embedded: the distribution holding the GGUF file
    gguf_file: Optional[str] = None  # source=embedded: the file's path inside that distribution
    dtype: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | float32 | bfloat16 | float16
    attn_implementation: Optional[str] = None  # None lets transformers choose (sdpa); eager | flash_attention_2
    trust_remote_code: bool = False  # off by default: hub code is never run unless asked for
    tiny: Dict[str, Any] = field(default_factory=dict)  # source=tiny: LlamaConfig fields
    # Target presets: the LoRA `targets` names sampled by sweeps, mapped to this model's modules.
    target_presets: Dict[str, List[str]] = field(default_factory=dict)
    hub_id: Optional[str] = None  # the original hub repo this model corresponds to (model card)


@dataclass
class LoraSpec:
    name: str = "custom"
    r: int = 8  # rank
    alpha: float = 16.0  # lora_alpha; ignored when alpha_ratio is set
    alpha_ratio: Optional[float] = None  # alpha = alpha_ratio * r (how sweeps tie alpha to rank)
    dropout: float = 0.05
    targets: Any = "attn"  # a preset name from model.target_presets, or a list of module names
    bias: str = "none"  # none | all | lora_only
    modules_to_save: Optional[List[str]] = None  # fully trained modules (e.g. embed_tokens, lm_head)
    layers_to_transform: Optional[List[int]] = None  # restrict LoRA to these layer indices
    rank_pattern: Dict[str, int] = field(default_factory=dict)  # per-module rank overrides
    alpha_pattern: Dict[str, float] = field(default_factory=dict)  # per-module alpha overrides
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # weight-decomposed LoRA
    init_lora_weights: Any = True  # true | false | gaussian | pissa | olora | orthogonal ...


@dataclass
class QuantConfig:
    name: str = "none"
    mode: str = "none"  # none | int8 | nf4 | fp4 (bitsandbytes)
    double_quant: bool = True  # nested quantization of the 4-bit constants
    compute_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    skip_modules: List[str] = field(default_factory=lambda: ["lm_head"])  # kept in full precision


@dataclass
class TrainerConfig:
    name: str = "sft"
    # sft (TRL's SFTTrainer, prompt/completion data) | dpo (TRL's DPOTrainer, preference pairs) | grpo, rloo (TRL's
    # online RL trainers: prompts, sampled answers scored by `rewards`; train/grpo.py)
    method: str = "sft"
    # dpo: how far the tuned model may move from the reference (higher: closer); ipo reads it as its tau; grpo/rloo:
    # the KL penalty's coefficient (0: no KL term)
    beta: float = 0.1
    loss_type: str = "sigmoid"  # dpo: any TRL DPO loss (run_config.DPO_LOSSES); grpo: dapo, grpo, dr_grpo, ...
    epsilon: float = 0.2  # grpo/rloo: clip range of the probability ratio (PPO's), below 1 (and above, unless:)
    epsilon_high: Optional[float] = None  # grpo/rloo: the upper clip (DAPO's clip-higher); null: epsilon
    num_generations: int = 4  # grpo/rloo: answers sampled per prompt; divides batch_size x grad. accumulation
    temperature: float = 1.0  # grpo/rloo: sampling temperature of those answers (max_new_tokens at most)
    num_iterations: int = 1  # grpo/rloo: optimizer passes over each sampled batch (PPO's epochs)
    rewards: List[str] = field(default_factory=lambda: ["exact_match"])  # grpo/rloo: train/rewards.REWARDS, mod:fn
    reward_weights: List[float] = field(default_factory=list)  # grpo/rloo: one per reward (empty: 1 each)
    max_kl: Optional[float] = 4.0  # grpo/rloo: a logged KL above this stops the run as diverged (null: never)
    max_reward_drop: Optional[float] = None  # grpo/rloo: a reward this far below its best is a collapse (null: never)
    label_smoothing: float = 0.0  # dpo: robust / exo_pair label noise, in [0, 0.5)
    # dpo, grpo, rloo: start from this adapter instead of a fresh one (a folder holding adapter_config.json, or a
    # study whose promoted adapter results/<study>/full/adapter to continue: SFT, then DPO or RL); also the reference
    init_adapter: Optional[str] = None
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"  # any transformers SchedulerType
    warmup_steps: float = 0.0  # >= 1: steps; in [0, 1): ratio of total steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"  # any transformers OptimizerNames value
    batch_size: int = 8  # per device
    eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 48  # > 0, or -1 to train num_epochs
    num_epochs: float = 1.0
    max_length: int = 256  # tokens per row after the chat template; longer rows are truncated
    packing: bool = False
    # Rows of a batch concatenated into one sequence, no pad tokens (TRL's padding_free; attention kept
    # within each row by position_ids). auto: on with a flash-attention kernel (varlen, the real saving) on a
    # model without linear-attention layers and packing off; true also allows sdpa/eager/flex (block mask).
    padding_free: Any = "auto"  # auto | true | false
    # The fused LM head scores only positions with a label (the completion) on CPU too, as TRL does on CUDA.
    compact_lm_head: bool = True
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 / fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    logging_steps: int = 5
    eval_every: int = 20  # steps between cheap evals on the fixed eval subset (0: none)
    eval_subset: int = 32  # rows in that fixed subset
    # held-out items answered by greedy generation, scored by exact match, ROUGE-L and BLEU (0: skip)
    exact_match_items: int = 48
    # The run's final eval: full = every eval row; subset = the fixed eval subset, reusing the last
    # periodic eval when it fell on the last step (what short sweep trials use: no extra pass).
    final_eval: str = "full"
    max_new_tokens: int = 32  # generation budget for those answers (a longer free-text answer is cut here)
    num_threads: int = 0  # torch CPU threads (0: torch's default)


@dataclass
class DataConfig:
    name: str = "embedded"
    source: str = "embedded"  # embedded | local | hub
    path: Optional[str] = None  # local file (json, jsonl, csv, parquet) or hub dataset id
    subset: Optional[str] = None  # hub dataset configuration name
    revision: Optional[str] = None  # hub dataset revision
    split: str = "train"
    eval_split: Optional[str] = None  # an existing split to evaluate on; else eval_fraction is held out
    eval_path: Optional[str] = None  # an eval file (json, jsonl, csv, parquet; any layout), instead of the above
    eval_fraction: float = 0.1
    # preference: prompt/chosen/rejected (strings or message lists), or chosen/rejected dialogues sharing a prefix
    layout: str = "auto"  # auto | messages | prompt_completion | alpaca | dolly | preference | columns
    # layout=columns: prompt/completion/system -> column, or (preference pairs) prompt/chosen/rejected/system -> column
    columns: Dict[str, str] = field(default_factory=dict)
    system_prompt: Optional[str] = None  # prepended as a system message when the row has none
    format: str = "chat"  # chat: the tokenizer's chat template | raw: prompt + completion as plain text
    max_train_rows: Optional[int] = None
    max_eval_rows: Optional[int] = None
    seed: int = 0
    exact_match: bool = False  # answers are exact strings: exact match too (ROUGE-L and BLEU score any completions)
    # source=embedded: the generated tasks (layout=preference: the preference tasks, as chosen/rejected pairs)
    tasks: List[str] = field(default_factory=list)
    train_per_task: int = 200
    eval_per_task: int = 25


@dataclass
class TrackingConfig:
    name: str = "none"
    backend: str = "none"  # none | wandb
    mode: str = "auto"  # auto (online when WANDB_API_KEY is set, else offline) | offline | online | disabled
    project: str = "lora_search"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class BenchmarkConfig:
    name: str = "default"
    latency_prompts: int = 4  # prompts timed for generation latency
    max_new_tokens: int = 32
    repeats: int = 1
    int8_dynamic: bool = True  # on CPU, also measure a dynamically INT8-quantized merged copy


@dataclass
class NightlyConfig:
    enabled: bool = False  # a nightly job: resume the study, add trials, promote only a better champion
    trials_per_night: int = 6  # finished trials each night adds to the persistent study
    seed_top_k: int = 2  # re-run the k best earlier configurations first (enqueued) each night
    margin: float = 0.01  # a candidate must beat the champion's full-run metric by this fraction
    night: Optional[str] = None  # the night's label (results/<study>/nights/<night>/); default today's date


# The direction each sweep metric is optimized in (sweep.direction=auto follows it).
METRIC_DIRECTIONS = {"eval_loss": "minimize", "perplexity": "minimize", "exact_match": "maximize",
                     # greedy answers against free-text references: ROUGE-L F (0..1) and corpus BLEU (sacrebleu, 0-100)
                     "rouge_l": "maximize", "bleu": "maximize",
                     "train_tokens_per_s": "maximize",
                     # trainer=dpo: the eval pairs' reward accuracy and margin (TRL's, against the reference), and
                     # the preference accuracy (chosen log-probability above rejected, the tuned model alone)
                     "reward_accuracy": "maximize", "reward_margin": "maximize", "preference_accuracy": "maximize",
                     "reward": "maximize",  # grpo/rloo: the mean reward of greedy answers to held-out prompts
                     # costs, for sweep.objectives next to a quality metric: the adapter's trainable parameters and
                     # its size (fp32 tensors, as saved), the trial's peak memory (hardware.PeakMemory) and seconds
                     # per optimizer step
                     "trainable_params": "minimize", "adapter_mb": "minimize", "peak_memory_mb": "minimize",
                     "step_s": "minimize"}
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "preference_accuracy")
# Scored on greedy answers to eval prompts (evaluate.score, one generation pass for all three): trials generate
# sweep.exact_match_items answers when one is an objective. They need reference answers (prompt/completion data, not
# preference pairs); exact_match also needs exact ones (data.exact_match).
GENERATION_METRICS = ("exact_match", "rouge_l", "bleu")
# What a trial's quality is measured by (the others are costs): the metric pruning and the single-objective paths read
QUALITY_METRICS = ("eval_loss", "perplexity") + GENERATION_METRICS + PREFERENCE_METRICS + ("reward",)


@dataclass
class SweepConfig:
    name: str = "rank_lr"  # study name (results/<name>/); the sweep file's name unless set
    n_trials: int = 12  # finished (complete or pruned) trials the study needs, across all runs and workers
    timeout_s: Optional[float] = None  # wall-clock budget for the search in this invocation
    # the objective: a key of a trial's metrics (eval_loss, perplexity, exact_match, rouge_l, bleu, ...)
    metric: str = "eval_loss"
    # Several objectives (an Optuna multi-objective study; its Pareto front): [{metric: eval_loss}, {metric:
    # trainable_params, direction: minimize}] or [eval_loss, adapter_mb]; each from METRIC_DIRECTIONS, its direction
    # the metric's own unless stated (a contrary one is refused). When given, sweep.metric becomes its first quality
    # metric (what the trials' periodic evals measure). Optuna's pruners are single-objective: none prunes here.
    objectives: List[Any] = field(default_factory=list)
    # Memory per trial, MB: a number, or auto (the device's free memory when the sweep starts: free GPU memory, CPU RAM
    # available plus this process's own). A configuration whose estimated peak (memory.estimate) is over it is not
    # trained: it is recorded infeasible (Optuna's constraint) and does not count toward n_trials; one that runs out
    # of memory anyway is recorded the same way and scales the estimates up for the rest of the study. null: no budget.
    memory_budget_mb: Any = None
    # auto: the metric's own direction (METRIC_DIRECTIONS); an explicit direction against it is refused
    direction: str = "auto"  # auto | minimize | maximize
    # The sampler and pruner: a name (sweep.sampler=random) or {type: name, **constructor kwargs}. A mapping in a
    # sweep file or on the command line replaces the default whole (nothing merged in: no seed unless it says so).
    # gp (Optuna's Gaussian-process sampler) | nsgaii (several objectives). Each worker's sampler gets seed + its
    # worker index, and TPE's constant liar is on, so workers started together do not sample the same configuration.
    sampler: Any = "tpe"  # tpe | random | grid | cmaes | gp | nsgaii
    pruner: Any = "median"  # median | successive_halving | hyperband | none
    # metric=exact_match, rouge_l or bleu: eval items each trial answers by greedy generation (its cost is the
    # trial's exact_match_s); other metrics generate nothing in trials. sweep.trial's trainer.exact_match_items wins.
    exact_match_items: int = 16
    # Config groups this sweep picks unless the command line picks them (sweeps/dpo_beta.yaml: trainer: dpo,
    # data: embedded_preference), so `sweep=<name>` alone composes the run the sweep was written for.
    groups: Dict[str, str] = field(default_factory=dict)
    space: Dict[str, Any] = field(default_factory=dict)  # dotted config key -> {type, low, high, log, step, choices}
    enqueue: List[Dict[str, Any]] = field(default_factory=list)  # trials to run first: {dotted key: value}
    trial: Dict[str, Any] = field(default_factory=dict)  # dotted overrides for the short trials
    # Dotted overrides for the full run of the promoted trial; its `select` entry, if any, is the promotion rule
    # that picks that trial (pareto.py): {metric: eval_loss, within: 0.02, then: {metric: trainable_params}} = the
    # smallest adapter within 2% of the best loss. Default: the best trial (several objectives: best on the first).
    promotion: Dict[str, Any] = field(default_factory=dict)
    # An SQLAlchemy URL for Optuna; default $LORA_SEARCH_STORAGE, else sqlite:///results/<name>/study.db. A password
    # given here on the command line is moved to $LORA_SEARCH_STORAGE and masked in everything written.
    storage: Optional[str] = None
    workers: int = 1  # worker processes on this machine (one per GPU: CUDA_VISIBLE_DEVICES is split)
    heartbeat_s: int = 60  # a worker silent for 2x this is dead: its trial is failed and retried once
    # Failed trials in a row (in this process; a complete or pruned trial resets the count) that stop the sweep, with
    # a summary of their errors and exit code 4. Failed trials never count toward n_trials. null: never stop.
    max_failures: Optional[int] = 5
    nightly: NightlyConfig = field(default_factory=NightlyConfig)


@dataclass
class PreviewConfig:
    rows: int = 5  # `preview`: rows shown as the model sees them (after the chat template)


@dataclass
class DashboardConfig:
    host: str = "127.0.0.1"  # optuna-dashboard has no authentication: bind elsewhere only on a trusted network
    port: int = 8080


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    quant: QuantConfig = field(default_factory=QuantConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    stage: str = "all"  # all (search, promote, merge, benchmark, report) | one of them | train
    force: bool = False  # re-run finished stages after the search (promotion, merge, benchmark)
    worker: int = 0  # this process's index among a study's workers (Hydra multirun: worker=range(8))
    run_name: Optional[str] = None  # results/runs/<run_name>; default <model>-<lora>-<time>
    results_dir: str = "results"
    cache_dir: Optional[str] = None  # converted models; default $LORA_SEARCH_CACHE or ~/.cache/lora_search


GROUPS = {
    "model": ModelConfig,
    "lora": LoraSpec,
    "quant": QuantConfig,
    "trainer": TrainerConfig,
    "data": DataConfig,
    "tracking": TrackingConfig,
    "benchmark": BenchmarkConfig,
    "sweep": SweepConfig,
}
STAGES = ("all", "search", "promote", "merge", "benchmark", "report", "train")


def register() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig, provider="lora_search")
    for group, schema in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema, provider="lora_search")
