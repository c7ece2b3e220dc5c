"""Stage `benchmark`: the base model against the merged (tuned) one on the same eval set and the same
prompts: eval loss and perplexity through TRL's SFTTrainer (formatted exactly as in training),
exact match, ROUGE-L and BLEU of greedy answers, generation latency at batch size 1, peak memory
and size on disk; also the unmerged adapter's latency and, on CPU, a dynamically INT8-quantized
merged copy.

Each model is loaded once and freed before the next. Writes `results/<study>/benchmark.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import snapshot_download

from lora_search.config.schema import RunConfig
from lora_search.core import hardware, records
from lora_search.data.load import TaskData
from lora_search.models import adapters, loaders
from lora_search.promote.merge import free_memory, load_full_precision, weights_mb
from lora_search.train import dpo, evaluate
from lora_search.train.run import sft_config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Prompts:
    """The prompts every model is timed and scored on."""

    latency: list[str]  # formatted texts (chat template with generation prompt, or raw)
    chat: bool  # chat texts already hold their special tokens


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def latency(model, tokenizer, prompts: Prompts, max_new_tokens: int, repeats: int) -> dict:
    """Greedy generation at batch size 1, exactly max_new_tokens per prompt, after one warm-up: p50/p95 s per prompt."""
    model.eval()
    device = next(model.parameters()).device
    batches = [tokenizer(t, return_tensors="pt", add_special_tokens=not prompts.chat).to(device)
               for t in prompts.latency]
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.generate(**batches[0], **kwargs)  # warm-up: lazy inits, allocator, kernels
    times, tokens = [], 0
    for _ in range(repeats):
        for batch in batches:
            _sync()
            t0 = time.perf_counter()
            out = model.generate(**batch, **kwargs)
            _sync()
            times.append(time.perf_counter() - t0)
            tokens += out.shape[1] - batch["input_ids"].shape[1]
    return {
        "latency_p50_s": float(np.percentile(times, 50)),
        "latency_p95_s": float(np.percentile(times, 95)),
        "latency_mean_s": float(np.mean(times)),
        "tokens_per_s": tokens / sum(times),
        "new_tokens_per_prompt": tokens / len(times),
        "timed_generations": len(times),
    }


def eval_loss(model, tokenizer, cfg: RunConfig, data: TaskData) -> dict:
    """Eval loss and perplexity on every eval row, completion tokens only, through TRL's SFTTrainer as in training."""
    from trl import SFTTrainer

    with tempfile.TemporaryDirectory() as tmp, adapters.trainer_patches_undone(model):
        # The training run's own SFTConfig: same formatting, truncation and precision as its evals.
        args = sft_config(cfg, Path(tmp), [])
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=data.train.select(range(1)),  # required, never trained on
                             eval_dataset=data.eval)
        try:
            loss = float(trainer.evaluate()["eval_loss"])
        finally:
            trainer.accelerator.free_memory()
            del trainer
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}


def generates(cfg: RunConfig, data: TaskData) -> int:
    """How many held-out items the benchmark answers by greedy generation: trainer.exact_match_items of
    prompt/completion data (preference pairs have no reference answer to score against)."""
    return min(cfg.trainer.exact_match_items, len(data.eval_answers)) if data.kind == "sft" else 0


def exact_match(model, tokenizer, cfg: RunConfig, data: TaskData) -> dict:
    """Greedy answers to the first trainer.exact_match_items held-out items, one generation pass: ROUGE-L and BLEU
    against the reference answers, and exact match when they are exact (data.exact_match)."""
    n = generates(cfg, data)
    if not n:
        return {}
    scores = evaluate.score(model, tokenizer, data.eval_prompts(n), data.eval_answers[:n], cfg.trainer.max_new_tokens,
                            cfg.trainer.eval_batch_size)
    exact = {"exact_match": scores["exact_match"]} if cfg.data.exact_match else {}
    return {**exact, "rouge_l": scores["rouge_l"], "bleu": scores["bleu"], "exact_match_items": n,
            "samples": scores["samples"]}


def disk_mb(path: str, revision: str | None = None) -> float | None:
    """Safetensors size of a local folder, or of a hub model already in the local hub cache."""
    size = weights_mb(path)
    if size is None:
        try:
            size = weights_mb(snapshot_download(path, revision=revision, local_files_only=True,
                                                allow_patterns=["*.safetensors"]))
        except Exception:  # not cached locally: the size is unknown, not an error
            return None
    return size


def state_dict_mb(model) -> float:
    """Size of the model's state_dict saved with torch.save (MiB): for models safetensors cannot hold."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state_dict.pt"
        torch.save(model.state_dict(), path)
        return round(path.stat().st_size / 2**20, 3)


def _quantize_dynamic():
    return getattr(getattr(torch, "ao", None) and torch.ao.quantization, "quantize_dynamic", None)


def quantize_int8_dynamic(model):
    """Dynamic INT8 quantization of every Linear (int8 weights, activations quantized on the fly), in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated since torch 2.10 in favour of torchao, still present
        return _quantize_dynamic()(model.float(), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def preference(model, tokenizer, cfg: RunConfig, data: TaskData) -> dict:
    """Preference pairs: every eval pair's chosen and rejected log-probability (tokenized as DPOTrainer does), the
    preference accuracy and the mean margin."""
    pairs = dpo.tokenize_pairs(data.eval, tokenizer)
    chosen, rejected = dpo.pair_logps(model, tokenizer, pairs, cfg.trainer.max_length,
                                      max(1, cfg.trainer.eval_batch_size // 2))
    return {**dpo.preference_scores(chosen, rejected), "chosen_logps": chosen, "rejected_logps": rejected}


def measure(model, tokenizer, cfg: RunConfig, data: TaskData, prompts: Prompts, loss: bool = True,
            em: bool = True) -> dict:
    """Eval loss and perplexity (when loss; preference pairs: preference accuracy and margin), the answers' exact
    match, ROUGE-L and BLEU (when em), then generation latency, of one model."""
    out = {}
    if loss and data.kind == "preference":
        out.update(preference(model, tokenizer, cfg, data))
    elif loss:
        out.update(eval_loss(model, tokenizer, cfg, data))
    if em:
        out.update(exact_match(model, tokenizer, cfg, data))
    out.update(latency(model, tokenizer, prompts, cfg.benchmark.max_new_tokens, cfg.benchmark.repeats))
    return out


@contextlib.contextmanager
def entry(label: str):
    """A dict to fill with one model's numbers; peak memory and wall time are added when the block ends."""
    record, t0 = {}, time.perf_counter()
    with hardware.PeakMemory() as peak:
        start_mb = peak.peak_mb  # CPU: the process RSS as the entry starts; CUDA: 0
        yield record
    record["peak_memory_mb"] = round(peak.peak_mb, 1)
    record["memory_added_mb"] = round(max(0.0, peak.peak_mb - start_mb), 1)
    record["seconds"] = time.perf_counter() - t0
    log.info("benchmark %s: %s", label, {k: v for k, v in record.items() if k != "samples"})


def benchmark_stage(cfg: RunConfig, study_dir: Path, data: TaskData) -> dict:
    """Base vs merged (and unmerged adapter, INT8 on CPU): quality, latency, memory, size; write benchmark.json."""
    from peft import PeftModel

    t0 = time.perf_counter()
    study_dir = Path(study_dir)
    adapter_dir, merged_dir = study_dir / "full" / "adapter", study_dir / "full" / "merged"
    if not (merged_dir / "config.json").exists():
        raise FileNotFoundError(f"no merged model at {merged_dir}: run the merge stage first")
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    base_path = loaders.local_copy(cfg.model, cfg.cache_dir)
    raw = data.eval_prompts(cfg.benchmark.latency_prompts)
    report: dict = {}

    with entry("base") as report["base"]:
        loaded = load_full_precision(cfg)
        tok = loaded.tokenizer
        prompts = Prompts(evaluate.prompt_texts(tok, raw), bool(raw) and isinstance(raw[0], list))
        report["base"].update(measure(loaded.model, tok, cfg, data, prompts),
                              size_mb=disk_mb(base_path, cfg.model.revision), path=base_path)
    del loaded
    free_memory()

    if (adapter_dir / "adapter_config.json").exists():
        with entry("adapter") as report["adapter"]:  # unmerged: base + PeftModel, for merged vs unmerged latency
            loaded = load_full_precision(cfg)
            peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_dir))
            report["adapter"].update(measure(peft_model, tok, cfg, data, prompts, loss=False, em=False),
                                     size_mb=weights_mb(adapter_dir), path=str(adapter_dir))
        del loaded, peft_model
        free_memory()
    else:
        report["adapter"] = {"skipped": f"no adapter at {adapter_dir}"}

    with entry("tuned") as report["tuned"]:
        loaded = load_full_precision(cfg, merged_dir)
        report["tuned"].update(measure(loaded.model, tok, cfg, data, prompts),
                               size_mb=weights_mb(merged_dir), path=str(merged_dir))

    if cfg.benchmark.int8_dynamic and hardware.device().type == "cpu":
        if _quantize_dynamic() is None:
            report["int8_dynamic"] = {"skipped": f"torch {torch.__version__} has no torch.ao.quantization."
                                                 "quantize_dynamic (its replacement: torchao's quantize_)"}
        else:
            with entry("int8_dynamic") as report["int8_dynamic"]:
                model = quantize_int8_dynamic(loaded.model)  # the merged model, already loaded: in place
                # No eval loss: TRL's fused LM-head loss reads lm_head.weight, which a quantized Linear lacks (pair
                # log-probs come from plain logits: scored).
                report["int8_dynamic"].update(measure(model, tok, cfg, data, prompts,
                                                      loss=data.kind == "preference"),
                                              size_mb=state_dict_mb(model), size_of="serialized state_dict")
            del model
    del loaded
    free_memory()

    if data.kind == "preference":  # the tuned model's rewards against the base, as DPO defines them

        base, tuned = report["base"], report["tuned"]
        report["tuned"].update(dpo.reward_against(tuned["chosen_logps"], tuned["rejected_logps"], base["chosen_logps"],
                                                  base["rejected_logps"], cfg.trainer.beta))
        report["pair_samples"] = [
            {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
             "base_margin": base["chosen_logps"][i] - base["rejected_logps"][i],
             "tuned_margin": tuned["chosen_logps"][i] - tuned["rejected_logps"][i]}
            for i, row in enumerate(data.eval.select(range(min(4, len(data.eval)))))]
    for numbers in [e for e in report.values() if isinstance(e, dict)]:
        for key in ("chosen_logps", "rejected_logps"):
            numbers.pop(key, None)

    report["settings"] = {
        **dataclasses.asdict(cfg.benchmark),
        "batch_size": 1,
        "exact_match_items": generates(cfg, data),  # answers scored by exact match (exact data), ROUGE-L, BLEU
        "exact_match_max_new_tokens": cfg.trainer.max_new_tokens,
        "eval_rows": len(data.eval),
        "method": cfg.trainer.method,
        "beta": cfg.trainer.beta if cfg.trainer.method == "dpo" else None,
        "max_length": cfg.trainer.max_length,
        "precision": hardware.precision(cfg.trainer.precision),
        "dtype": str(hardware.model_dtype(cfg.model.dtype)).replace("torch.", ""),
        "device": str(hardware.device()),
        "peak_memory": "CUDA max allocated" if torch.cuda.is_available()
        else "process RSS (includes memory earlier entries left to the allocator; see memory_added_mb)",
    }
    report["machine"] = hardware.machine()
    report["seconds"] = time.perf_counter() - t0
    records.write_json(study_dir / "benchmark.json", report)
    return report
