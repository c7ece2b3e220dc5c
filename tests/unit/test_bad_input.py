"""The bad-input catalogue (docs/bad-input.md): each input gets one `error:` line that names what is wrong and what
is accepted, exit code 2, no traceback, and nothing under results/ changes (a study recorded earlier stays as it was).

Each case runs the real entry point, `lora_search.__main__.main`, in this process: every one of these is refused
before Hydra starts the run, so no Hydra state is left behind. test_cli.py runs some of them as real subprocesses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lora_search.__main__ import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"


def _write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def _files(tmp: Path) -> dict[str, str]:
    """The data files the cases use, written under tmp."""
    ok = "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(6))
    return {
        "EMPTY": _write(tmp / "empty.jsonl", ""),
        "BADJSON": _write(tmp / "bad.jsonl", ok + '{"prompt": "q", "completion": "a"\n'),
        "NOASSISTANT": _write(tmp / "noassistant.jsonl", "".join(
            json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}]}) + "\n" for i in range(4))),
        "LATIN1": _write(tmp / "latin1.jsonl", ok.encode() + '{"prompt": "café", "completion": "été"}\n'.encode("latin-1")),
        "OKFILE": _write(tmp / "ok.jsonl", ok),
        "NESTED": _write(tmp / "nested.jsonl", ok + json.dumps({"prompt": "q", "completion": {"text": "a"}}) + "\n"),
        "TXTFILE": _write(tmp / "notes.txt", "hello"),
        "NOLAYOUT": _write(tmp / "nolayout.jsonl", '{"question": "q", "reply": "a"}\n' * 3),
        "QAFILE": _write(tmp / "qa.jsonl", "".join(
            json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(6))),
        "EMPTYDIR": str((tmp / "emptydir").mkdir() or tmp / "emptydir"),
        "NOREJECTED": _write(tmp / "norejected.jsonl", "".join(
            json.dumps({"prompt": f"q{i}", "chosen": f"a{i}"}) + "\n" for i in range(6))),
        "SAMEPAIRS": _write(tmp / "same.jsonl", "".join(
            json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"a{i}"}) + "\n" for i in range(6))),
        "PAIRS": _write(tmp / "pairs.jsonl", "".join(
            json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n" for i in range(6))),
    }


def _id(case) -> str:
    """A case's id (a plain tuple, or a pytest.param with marks)."""
    return case.values[0] if hasattr(case, "values") else case[0]


# (id, arguments, text the one error line must contain). The ids are the rows of docs/bad-input.md.
CASES = [
    ("unknown-config-choice", ["model=gpt5"], "model=gpt5 is not a known model config"),
    ("unknown-sweep", ["sweep=rank_lrr"], "sweep=rank_lrr is not a known sweep config (did you mean rank_lr?)"),
    ("misspelt-key", ["trainr.learning_rate=1e-4"], "unknown config key 'trainr.learning_rate'; did you mean trainer.learning_rate?"),
    ("unparseable-command-line", ["lora.r=[4,"], "cannot parse the command line"),
    ("wrong-type", ["lora.r=abc"], "lora.r must be an integer, got 'abc'"),
    ("not-a-boolean", ["trainer.packing=maybe"], "trainer.packing must be true or false, got 'maybe'"),
    ("rank-zero", ["lora.r=0"], "lora.r must be a positive integer, got 0"),
    ("dropout-out-of-range", ["lora.dropout=1.5"], "lora.dropout must be in [0, 1), got 1.5"),
    ("negative-learning-rate", ["trainer.learning_rate=-3e-4"], "trainer.learning_rate must be a positive number, got -0.0003"),
    ("unknown-target-preset", ["lora.targets=fused"], "lora.targets: unknown preset 'fused'"),
    ("target-matches-no-module", ["lora.targets=[q_proj,wq]"], "lora.targets: entry 'wq' matches no module"),
    ("unknown-precision", ["trainer.precision=fp8"], "trainer.precision must be one of auto, fp32, bf16, fp16; got 'fp8'"),
    ("unknown-quant-mode", ["quant.mode=int3"], "quant.mode must be one of none, int8, nf4, fp4; got 'int3'"),
    ("max-length-too-small", ["trainer.max_length=8"], "trainer.max_length must be an integer >= 16, got 8"),
    ("unknown-stage", ["stage=trian"], "stage must be one of all, search, promote"),
    ("eval-fraction-out-of-range", ["data.eval_fraction=1.5"], "data.eval_fraction must be in (0, 1), got 1.5"),
    ("data-path-missing", ["data=local"], "data.path is required"),
    ("data-file-not-found", ["data=local", "data.path=/nonexistent/train.jsonl"], "data.path: no such file '/nonexistent/train.jsonl'"),
    ("data-file-type", ["data=local", "data.path=TXTFILE"], "unsupported file type '.txt'; accepted: .json, .jsonl, .csv, .parquet"),
    ("data-layout-unknown", ["data=local", "data.path=NOLAYOUT"], "cannot tell the layout from its columns (question, reply)"),
    ("data-columns-missing", ["data=local", "data.path=NOLAYOUT", "data.layout=prompt_completion"],
     "is missing column(s) prompt, completion; it has: question, reply"),
    ("data-file-empty", ["data=local", "data.path=EMPTY"], "is empty (0 rows)"),
    ("data-invalid-json-line", ["data=local", "data.path=BADJSON"], "invalid JSON on line 7, column 34"),
    ("data-no-assistant-turn", ["data=local", "data.path=NOASSISTANT"],
     "no usable rows: 4 rows without an assistant turn (first at line 1)"),
    ("data-not-utf8", ["data=local", "data.path=LATIN1"], "is not UTF-8 text: byte 237 (line 7) is 0xe9; save it as UTF-8"),
    ("data-value-not-text", ["data=local", "data.path=NESTED"],
     "line 7 holds a JSON object where text is expected ({'text': 'a'})"),
    ("data-column-mapping-missing", ["data=local", "data.path=QAFILE", "data.layout=columns",
                                     "data.columns.prompt=question", "data.columns.completion=answr"],
     "is missing column(s) answr (data.columns.completion='answr'); it has: question, answer"),
    ("eval-file-not-found", ["data=local", "data.path=OKFILE", "data.eval_path=/nonexistent/eval.jsonl"],
     "data.eval_path: no such file '/nonexistent/eval.jsonl'"),
    ("hub-dataset-offline", ["data=hub", "data.path=nobody/nothing-here"], "cannot reach or find this dataset"),
    ("storage-unreachable", ["sweep.storage=postgresql+psycopg://lora:hunter2@127.0.0.1:9/studies"],
     "sweep.storage 'postgresql+psycopg://lora:***@127.0.0.1:9/studies': cannot connect"),
    ("storage-misspelt-dialect", ["sweep.storage=postgress://lora:hunter2@127.0.0.1/studies"],
     "sweep.storage: unknown database dialect 'postgress'"),
    ("password-outside-storage", ["run_name=postgresql://lora:hunter2@db/studies"],
     "run_name: a password inside a URL is accepted only in sweep.storage"),
    ("heartbeat-not-positive", ["sweep.heartbeat_s=0"], "sweep.heartbeat_s must be a positive integer"),
    ("max-failures-zero", ["sweep.max_failures=0"], "sweep.max_failures must be a positive integer"),
    ("space-key-no-trial-acts-on", ["++sweep.space={tracking.mode: {type: categorical, choices: [offline, disabled]}}"],
     "sweep.space: tracking.mode cannot be swept"),
    ("base-rewriting-init-in-a-sweep", ["lora.init_lora_weights=pissa"],
     "lora.init_lora_weights=pissa from the composed config (lora=... or lora.init_lora_weights=...) rewrites the base"),
    ("exact-match-without-generation", ["sweep.metric=exact_match", "sweep.exact_match_items=0"],
     "sweep.metric=exact_match needs eval items answered in every trial"),
    ("exact-match-without-answers", ["sweep.metric=exact_match", "data=local", "data.path=OKFILE"],
     "sweep.metric=exact_match needs data with exact answers (data.exact_match)"),
    ("text-metric-on-preference-pairs", ["sweep=dpo_beta", "sweep.metric=rouge_l"],
     "sweep.metric=rouge_l scores generated answers against reference answers, which preference pairs "
     "(trainer=dpo, data=embedded_preference) do not have"),
    ("misspelt-metric", ["sweep.metric=rougeL"], "; got 'rougeL' (did you mean rouge_l?)"),
    ("direction-contradicts-metric", ["sweep.direction=maximize"], "sweep.direction=maximize contradicts sweep.metric=eval_loss"),
    ("local-model-not-a-model", ["model=local", "model.path=EMPTYDIR"], "model.path"),
    ("hub-model-offline", ["model=qwen2_5_0_5b"], "cannot read its config from the hub"),
    ("model-folder-missing", ["model=local", "model.path=/nonexistent/model"], "model.path: no such folder '/nonexistent/model'"),
    ("unknown-tracking-mode", ["tracking.mode=sometimes"], "tracking.mode must be one of"),
    ("n-trials-zero", ["sweep.n_trials=0"], "sweep.n_trials must be a positive integer, got 0"),
    ("unknown-metric", ["sweep.metric=accuracy"],
     "sweep.metric must be one of eval_loss, perplexity, exact_match, rouge_l, bleu"),
    ("unknown-direction", ["sweep.direction=up"], "sweep.direction must be auto (the metric's), minimize or maximize; got 'up'"),
    ("negative-timeout", ["sweep.timeout_s=-1"], "sweep.timeout_s must be positive or null, got -1"),
    ("unknown-sampler", ["sweep.sampler=bayes"], "sweep.sampler.type must be one of tpe, random, grid, cmaes, gp, nsgaii; got 'bayes'"),
    ("unknown-sampler-argument", ["sweep.sampler={type: tpe, n_startup: 3}"], "sweep.sampler (tpe):"),
    ("unknown-pruner-argument", ["sweep.pruner={type: median, patience: 3}"], "sweep.pruner (median):"),
    ("grid-over-a-float", ["sweep.sampler=grid"], "grid needs categorical entries"),
    ("space-key-unknown", ["++sweep.space={lora.rnak: {type: categorical, choices: [4, 8]}}"],
     "unknown config key 'lora.rnak'; did you mean lora.r?"),
    ("space-empty", ["sweep.space={}"], "sweep.space is empty: every trial would train the same configuration"),
    ("space-low-above-high", ["++sweep.space={lora.dropout: {type: float, low: 0.2, high: 0.1}}"],
     "sweep.space.lora.dropout: low must be below high, got low=0.2 high=0.1"),
    ("space-log-low-not-positive", ["++sweep.space={trainer.learning_rate: {type: float, low: 0, high: 1, log: true}}"],
     "a log scale needs low > 0"),
    ("space-unknown-distribution", ["++sweep.space={lora.r: {type: normal, mean: 8}}"],
     "must be a distribution with type float, int or categorical; got 'normal'"),
    ("space-allows-invalid-value", ["++sweep.space={trainer.batch_size: {type: int, low: 0, high: 8}}"],
     "sweep.space allows trainer.batch_size=0, which is invalid"),
    ("space-allows-unknown-preset", ["++sweep.space={lora.targets: {type: categorical, choices: [qv, everything]}}"],
     "lora.targets: unknown preset 'everything'"),
    ("trial-block-unknown-key", ["++sweep.trial={trainer.max_stepz: 4}"], "sweep.trial: unknown config key 'trainer.max_stepz'"),
    ("report-on-a-missing-study", ["stage=report", "sweep.name=nosuch"],
     "no study 'nosuch' in storage 'sqlite:///"),
    ("dpo-pairs-without-rejected", ["trainer=dpo", "data=local", "data.path=NOREJECTED"],
     "has a chosen column but no rejected column: preference pairs need both chosen and rejected"),
    ("dpo-pairs-all-identical", ["trainer=dpo", "data=local", "data.path=SAMEPAIRS"],
     "no usable rows: 6 rows with identical chosen and rejected answers (nothing to prefer) (first at line 1)"),
    ("dpo-with-sft-data", ["trainer=dpo"],
     "trainer=dpo trains on preference pairs, but data=embedded holds prompt/completion rows"),
    ("sft-with-preference-pairs", ["data=local", "data.path=PAIRS"],
     "trainer=sft trains on prompt/completion rows, but data=local"),
    ("dpo-beta-not-positive", ["sweep=dpo_beta", "trainer.beta=0"], "trainer.beta must be a positive number"),
    ("dpo-space-allows-beta-zero", ["sweep=dpo_beta", "++sweep.space={trainer.beta: {type: float, low: 0, high: 1}}"],
     "sweep.space allows trainer.beta=0, which is invalid"),
    ("dpo-unknown-loss-type", ["sweep=dpo_beta", "trainer.loss_type=kto"], "trainer.loss_type must be one of sigmoid"),
    ("dpo-eval-loss-across-betas", ["sweep=dpo_beta", "sweep.metric=eval_loss"],
     "sweep.metric=eval_loss compares DPO losses, which trainer.beta rescale(s)"),
    ("preference-metric-with-sft", ["sweep.metric=reward_accuracy"],
     "sweep.metric=reward_accuracy is measured on preference pairs by trainer=dpo"),
    ("dpo-init-adapter-not-found", ["sweep=dpo_beta", "trainer.init_adapter=nosuch"],
     "trainer.init_adapter: 'nosuch' is neither an adapter folder"),
    ("rl-reward-not-importable", ["trainer=grpo", "trainer.rewards=[nosuchmodule:score]"],
     "trainer.rewards: cannot import 'nosuchmodule:score' (ModuleNotFoundError"),
    ("rl-reward-wrong-signature", ["trainer=grpo", "trainer.rewards=[os.path:join]"],
     "trainer.rewards: os.path:join has the signature join(a, *p); a reward takes TRL's keyword arguments"),
    ("rl-unknown-reward", ["trainer=rloo", "trainer.rewards=[exact]"], "trainer.rewards: unknown reward 'exact'"),
    ("rl-generations-do-not-divide-the-batch", ["trainer=grpo", "trainer.num_generations=3"],
     "trainer.num_generations=3 must divide the answers sampled at once"),
    ("rl-eval-loss-as-the-metric", ["trainer=grpo"],
     "sweep.metric=eval_loss is not measured by trainer=grpo (an RL loss says nothing of quality)"),
    ("reward-metric-without-rl", ["sweep.metric=reward"],
     "sweep.metric=reward is the held-out reward of greedy answers, measured by trainer=grpo or rloo"),
    ("rl-reward-weights-count", ["trainer=grpo", "trainer.reward_weights=[1,2]"],
     "trainer.reward_weights has 2 weight(s) for 1 reward(s)"),
    ("rl-with-preference-pairs", ["trainer=grpo", "sweep.metric=reward", "data=local", "data.path=PAIRS"],
     "trainer=grpo samples answers to prompts and scores them with trainer.rewards, but data=local"),
    ('objective-unknown-metric', ['sweep.objectives=[eval_loss,accuracy]'], 'sweep.objectives[1].metric must be one of eval_loss'),
    ('objective-direction-contradicts-metric', ['sweep.objectives=[{metric: eval_loss, direction: maximize},trainable_params]'], 'sweep.objectives[0].direction=maximize contradicts eval_loss, which is minimized'),
    ('objectives-costs-only', ['sweep.objectives=[trainable_params,adapter_mb]'], 'sweep.objectives has costs only'),
    ('cost-as-the-only-metric', ['sweep.metric=trainable_params'], 'sweep.metric=trainable_params is a cost'),
    ('select-names-a-non-objective', ['sweep=rank_lr_pareto', '++sweep.promotion.select={metric: exact_match}'], 'sweep.promotion.select.metric=exact_match is not an objective of this study'),
    ('select-within-not-a-fraction', ['sweep=rank_lr_pareto', '++sweep.promotion.select={metric: eval_loss, within: 2, then: {metric: trainable_params}}'], 'sweep.promotion.select.within must be a fraction of the best value in [0, 1)'),
    ('promotion-top-k-zero', ['++sweep.promotion.top_k=0'], 'sweep.promotion.top_k must be a positive integer (how many of the best trials are re-trained at the promotion budget), got 0'),
    ('promotion-seeds-not-an-integer', ['++sweep.promotion.seeds=two'], "sweep.promotion.seeds must be a positive integer (how many training seeds each of them runs with), got 'two'"),
    ('cmaes-with-several-objectives', ['sweep=rank_lr_pareto', 'sweep.sampler=cmaes'], 'sweep.sampler=cmaes optimizes one objective'),
    ('memory-budget-not-a-number', ['sweep.memory_budget_mb=lots'], 'sweep.memory_budget_mb must be a positive number of MB, auto'),
    ('memory-budget-below-the-base-model', ['sweep.memory_budget_mb=0.01'], "is below the base model's own weights"),
    ('journal-folder-missing', ['sweep.storage=journal:///nonexistent/studies/s.journal'],
     "no such folder '/nonexistent/studies' for the journal file"),
    ('grpc-url-without-port', ['sweep.storage=grpc://proxyhost'], "a gRPC proxy URL is grpc://host:port"),
    pytest.param('grpc-proxy-not-running', ['sweep.storage=grpc://127.0.0.1:9'],
                 "no gRPC storage proxy answers at 127.0.0.1:9", marks=pytest.mark.slow),  # waits out the timeout
    ('sqlite-for-cluster-workers', ['-m', 'stage=search', 'hydra/launcher=slurm', 'sweep.workers=4'],
     "which several machines cannot share"),
]


@pytest.fixture
def results(tmp_path):
    """A results folder that already holds a recorded trial: a refused run must leave it exactly as it was."""
    folder = tmp_path / "results"
    trial = folder / "rank_lr" / "trials" / "0000"
    trial.mkdir(parents=True)
    (trial / "status.json").write_text('{"status": "complete"}\n')
    (folder / "rank_lr" / "study.db").write_bytes(b"recorded")
    return folder


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case, args, expected", CASES, ids=[_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, args, expected, results, tmp_path, tiny_cache, capsys,
                                                         monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub cases fail at once instead of retrying for ~25 s
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    files = _files(tmp_path)
    args = [re.sub(r"=([A-Z0-9]+)$", lambda m: "=" + files.get(m[1], m[1]), a) for a in args]
    if not any(a.startswith("model=") for a in args):
        args = ["model=tiny_llama", *args]
    before = _snapshot(results)
    with pytest.raises(SystemExit) as info:
        main([*args, f"results_dir={results}", f"cache_dir={tiny_cache}", "tracking=none"])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err and "hunter2" not in err
    assert _snapshot(results) == before


def test_every_catalogue_case_is_in_the_doc_and_every_doc_row_is_tested():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), flags=re.M)
    assert sorted(rows) == sorted(_id(c) for c in CASES)
    assert len(CASES) >= 30 and len({_id(c) for c in CASES}) == len(CASES)

