"""trainer=grpo / trainer=rloo on the tiny model: the reward rises on a reward that is easy to learn, a larger beta
keeps the policy nearer the reference, the reference is the shared base with the adapter disabled (no second model,
base bit-identical), a user's reward file is called with TRL's documented arguments, and rewards that return the
wrong count or NaN fail the run with that reason.

The easy reward: the share of lowercase ASCII letters in the answer. The tiny model's random weights make its
temperature-1 distribution nearly uniform over 259 bytes, so it is sampled at temperature 0.25 (entropy ~2.5 nats):
there each step's group spread gives GRPO a clear signal (measured here: mean reward 0.06 at step 1, above 0.85 from
step 4 on; greedy held-out answers go from no letters to all letters).
"""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lora_search.commands import train_stage
from lora_search.config.compose import load_config
from lora_search.models import adapters, loaders
from lora_search.train import dpo, grpo, rewards, run
from lora_search.train.pruning import PruningCallback

MODULE = "grpo_test_rewards"  # the user's reward file, written under a temporary folder on sys.path
REWARD_FILE = '''
import math, string

CALLS = []


def letters(prompts, completions, **kwargs):
    """Share of the answer's characters that are lowercase ASCII letters."""
    step = getattr(kwargs.get("trainer_state"), "global_step", None)  # the state object changes after the call
    CALLS.append({"prompts": prompts, "completions": completions, "step": step, **kwargs})
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in string.ascii_lowercase for ch in t) / max(len(t), 1) for t in texts]


def one_short(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def nan(prompts, completions, **kwargs):
    return [math.nan] * len(completions)
'''
RL_FAST = ["trainer=grpo", "data.train_per_task=24", "data.eval_per_task=4", "trainer.max_steps=8",
           "trainer.eval_every=0", "trainer.exact_match_items=4", "trainer.max_new_tokens=8", "trainer.eval_subset=4",
           "trainer.final_eval=subset", f"trainer.rewards=[{MODULE}:letters]", "lora.targets=all_linear",
           "trainer.learning_rate=1e-2", "trainer.temperature=0.25", "trainer.max_reward_drop=null"]


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_rewards")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(REWARD_FILE))
    sys.path.insert(0, str(folder))
    try:
        yield __import__(MODULE)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def rl_cfg(tmp_path_factory, reward_module):
    root = tmp_path_factory.mktemp("grpo")

    def make(*overrides):
        return load_config(["model=tiny_llama", f"results_dir={root / 'results'}", f"cache_dir={root / 'cache'}",
                            "tracking=none", *RL_FAST, *overrides])

    return make


@pytest.fixture(scope="module")
def rl_worker(rl_cfg):
    cfg = rl_cfg("trainer.beta=0.001")
    return train_stage.start_worker(cfg), cfg


@pytest.fixture(scope="module")
def low_beta_run(rl_worker, tmp_path_factory, reward_module):
    worker, cfg = rl_worker
    reward_module.CALLS.clear()
    before = loaders.checksum(worker.base.model)
    out = tmp_path_factory.mktemp("low_beta")
    metrics = run.train_adapter(worker, cfg, out)
    return metrics, before, list(reward_module.CALLS), out


@pytest.mark.slow  # 8 GRPO steps: ~25 s on an idle 2-core machine
def test_the_reward_rises_and_only_the_adapter_learns(low_beta_run, rl_worker, tmp_path):
    metrics, before, _, _ = low_beta_run
    worker, _ = rl_worker
    assert metrics["method"] == "grpo" and metrics["steps"] == 8 and metrics["diverged"] is None
    history = metrics["rl_history"]
    assert [h["step"] for h in history] == list(range(1, 9))
    assert history[0]["reward"] < 0.2  # the base rarely answers in lowercase letters
    assert sum(h["reward"] for h in history[-4:]) / 4 > 0.7
    assert metrics["base_reward"] == 0.0 and metrics["reward"] > 0.9  # greedy held-out answers: letters now
    assert history[0]["kl"] == 0.0 and metrics["train_kl_max"] > 0  # policy == reference before the first update
    for key in ("reward_std", "clip_fraction", "entropy", "completion_length"):
        assert all(math.isfinite(h[key]) for h in history), key
    assert metrics["train_entropy_last"] < metrics["train_entropy_first"]  # it settled on letters
    assert metrics["kl"] > 0 and 0 <= metrics["exact_match"] <= 1
    assert loaders.checksum(worker.base.model) == before
    assert not any("lora" in name for name, _ in worker.base.model.named_modules())


@pytest.mark.slow  # the run above
def test_the_saved_adapter_moved_and_holds_no_reference_copy(low_beta_run):
    metrics, _, _, out = low_beta_run
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(t) > 0 for t in lora_b)
    assert sum(t.numel() for t in adapter.values()) == metrics["trainable_params"]


@pytest.mark.slow  # two 8-step runs
def test_a_larger_beta_keeps_the_policy_nearer_the_reference(low_beta_run, rl_cfg, rl_worker, tmp_path):
    """Same seed, same data, same steps: beta 20 against 0.001. The first two steps are identical (the KL term has no
    gradient while policy == reference); after them the KL stays lower, and so does the exact held-out KL."""
    low, _, _, _ = low_beta_run
    worker, _ = rl_worker
    high = run.train_adapter(worker, rl_cfg("trainer.beta=20"), tmp_path / "high", with_baseline=False, save=False)
    assert high["rl_history"][1]["kl"] == pytest.approx(low["rl_history"][1]["kl"])
    later = [(h["kl"], lo["kl"]) for h, lo in zip(high["rl_history"][2:], low["rl_history"][2:])]
    assert sum(h for h, _ in later) < 0.6 * sum(lo for _, lo in later)  # measured: 0.43 against 1.24 a step
    assert high["kl"] < 0.75 * low["kl"]  # measured: 0.52 against 1.09
    assert high["reward"] < low["reward"]  # the leash costs reward on this short run


def test_a_user_reward_is_called_with_the_documented_arguments(rl_cfg, rl_worker, reward_module, tmp_path):
    worker, _ = rl_worker
    reward_module.CALLS.clear()
    run.train_adapter(worker, rl_cfg("trainer.max_steps=2"), tmp_path / "args", with_baseline=False, save=False)
    calls = list(reward_module.CALLS)
    training = [c for c in calls if len(set(map(str, c["prompts"]))) < len(c["prompts"])]  # sampled groups
    heldout = [c for c in calls if c not in training]  # greedy answers, one per held-out prompt
    assert len(training) == 2 and len(heldout) == 2  # a call per step; the final eval and the recorded answers
    for call in calls:
        assert set(call) >= {"prompts", "completions", "completion_ids", "answer", "trainer_state", "log_extra",
                             "log_metric"}
        n = len(call["completions"])
        assert len(call["prompts"]) == len(call["answer"]) == len(call["completion_ids"]) == n
        assert call["prompts"][0][-1]["role"] == "user"  # chat data: message lists
        assert call["completions"][0][0]["role"] == "assistant" and isinstance(call["answer"][0], str)
    assert len(training[0]["completions"]) == 8  # batch_size answers: 2 prompts x num_generations 4
    assert training[0]["prompts"][0] == training[0]["prompts"][3] != training[0]["prompts"][4]
    assert [c["step"] for c in training] == [0, 1]
    assert heldout[0]["step"] == 2 and heldout[1]["trainer_state"] is None


def test_the_reference_is_the_base_with_the_adapter_disabled(rl_worker, tmp_path, monkeypatch):
    import trl.trainer.grpo_trainer as grpo_trainer

    def no_second_model(*args, **kwargs):
        raise AssertionError("a reference model was loaded")

    monkeypatch.setattr(grpo_trainer, "create_model_from_path", no_second_model)
    worker, cfg = rl_worker
    base_params = sum(p.numel() for p in worker.base.model.parameters())
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        base_logits = worker.base.model(input_ids=ids).logits
    with adapters.trainer_patches_undone(worker.base.model):
        peft_model = run._attach(worker, cfg)
        trainer = None
        try:
            trainer, _ = run._trainer(worker, peft_model, cfg, tmp_path / "run", [], [])
            assert trainer.ref_model is None and dpo.REF not in peft_model.peft_config
            trainable, total = peft_model.get_nb_trainable_parameters()
            assert total == base_params + trainable  # the base once, plus one adapter
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(std=0.5)
                peft_model.eval()
                policy = peft_model(input_ids=ids).logits
                with peft_model.disable_adapter():  # what TRL's reference forward runs (no "ref" adapter)
                    reference = peft_model(input_ids=ids).logits
            kl = grpo.heldout_kl(peft_model, worker.base.tokenizer, ["hello"], ["world"])
        finally:
            run._release(worker, trainer, peft_model)
    assert torch.equal(reference, base_logits)
    assert (policy - base_logits).abs().max() > 0.1 and kl > 0


@pytest.mark.parametrize("reward, says", [("one_short", "returned 7 scores for 8 completions"),
                                          ("nan", "returned nan for completion 0")])
def test_a_bad_reward_fails_the_run_with_its_reason(rl_cfg, rl_worker, tmp_path, reward, says):
    worker, _ = rl_worker
    cfg = rl_cfg(f"trainer.rewards=[{MODULE}:{reward}]", "trainer.max_steps=2")
    with pytest.raises(rewards.RewardError, match=says):
        run.train_adapter(worker, cfg, tmp_path / "bad", with_baseline=False, save=False)
    assert not any("lora" in name for name, _ in worker.base.model.named_modules())


def test_a_kl_past_max_kl_stops_the_run_as_diverged(rl_cfg, rl_worker, tmp_path):
    worker, _ = rl_worker
    cfg = rl_cfg("trainer.beta=0.001", "trainer.max_kl=0.01")
    metrics = run.train_adapter(worker, cfg, tmp_path / "kl", with_baseline=False, save=False)
    assert metrics["diverged"].startswith("diverged: KL to the reference") and "at step 2" in metrics["diverged"]
    assert metrics["steps"] == 2


def test_rloo_trains_on_the_same_rewards(rl_cfg, rl_worker, tmp_path):
    worker, _ = rl_worker
    before = loaders.checksum(worker.base.model)
    cfg = rl_cfg("trainer=rloo", "trainer.beta=0.001", "trainer.max_steps=2")
    metrics = run.train_adapter(worker, cfg, tmp_path / "rloo", with_baseline=False, save=False)
    assert metrics["method"] == "rloo" and metrics["steps"] == 2
    assert [h["step"] for h in metrics["rl_history"]] == [1, 2]
    assert metrics["rl_history"][1]["kl"] > 0 and metrics["train_loss_first"] is not None
    assert loaders.checksum(worker.base.model) == before


def test_reward_collapse_and_pruning_on_the_heldout_reward():
    class Control:
        should_training_stop = False

    class State:
        global_step = 5

    watch, control = grpo.DivergenceWatch(max_kl=None, max_reward_drop=0.5, window=2), Control()
    for reward in (0.2, 0.9, 1.0, 0.3, 0.9, 0.4):  # one bad step in a good run is noise, not a collapse
        watch.on_log(None, State(), control, logs={"reward": reward})
    assert watch.reason is None and not control.should_training_stop
    watch.on_log(None, State(), control, logs={"reward": 0.0})  # the last two average 0.2, the best two 0.95
    assert watch.reason.startswith("diverged: reward collapsed to 0.2 (mean of the last 2 steps) at step 5 from "
                                   "its best 0.95")
    assert control.should_training_stop
    for maximize, sign in ((True, 1.0), (False, -1.0)):  # a study on the reward, or on eval_loss (minimized)
        callback = PruningCallback(None, "eval_loss", maximize=maximize)
        callback.read("eval_reward")
        assert (callback.metric, callback.sign) == ("eval_reward", 1.0 if maximize else -1.0)


def test_builtin_rewards_score_answers_against_the_reference():
    chat = [[{"role": "assistant", "content": text}] for text in ("Oslo", "The city is Oslo.", "Lima", "Oslo.\nok")]
    answer = ["Oslo"] * 4
    assert rewards.exact_match([], chat, answer) == [1.0, 0.0, 0.0, 0.0]
    assert rewards.contains([], chat, answer) == [1.0, 0.5, 0.0, 0.5]
    assert rewards.answer_format([], chat, answer) == [1.0, 0.0, 1.0, 0.0]
    weighted = rewards.score(rewards.resolve(["exact_match", "format"]), [2.0, 0.5], [], chat, {"answer": answer})
    assert weighted == [2.5, 0.0, 0.5, 0.0]


@pytest.mark.slow  # a 2-trial sweep, promotion, merge, benchmark and report
def test_a_grpo_sweep_searches_then_promotes_merges_and_benchmarks(make_cfg, reward_module):
    """sweep=grpo_kl picks trainer=grpo and data=embedded_rl itself; trials are scored on the held-out reward and
    pruned on the periodic evals' eval_reward; the stages after the search run as for SFT."""
    import optuna

    from lora_search.commands import pipeline
    from lora_search.core import records
    from lora_search.search import study as study_lib

    cfg = make_cfg("sweep=grpo_kl", "sweep.n_trials=2", "data.train_per_task=24", "data.eval_per_task=8",
                   "++sweep.space={trainer.beta: {type: float, low: 0.001, high: 0.1, log: true}}",
                   f"++sweep.trial={{trainer.rewards: [{MODULE}:letters], trainer.temperature: 0.25, "
                   "trainer.max_steps: 4, trainer.eval_every: 2, trainer.eval_subset: 4, trainer.exact_match_items: 4, "
                   "trainer.max_new_tokens: 8, trainer.learning_rate: 0.01, lora.targets: all_linear}",
                   f"++sweep.promotion={{top_k: 1, trainer.rewards: [{MODULE}:letters], trainer.temperature: 0.25, "
                   "trainer.max_steps: 4, trainer.eval_every: 0, trainer.exact_match_items: 4, "
                   "trainer.max_new_tokens: 8, trainer.learning_rate: 0.01, lora.targets: all_linear}",
                   "benchmark.latency_prompts=1", "benchmark.repeats=1", "benchmark.max_new_tokens=2",
                   "benchmark.int8_dynamic=false", "trainer.exact_match_items=4")
    assert (cfg.trainer.method, cfg.data.name, cfg.sweep.metric, cfg.sweep.direction) == \
        ("grpo", "embedded_rl", "reward", "maximize")
    assert pipeline.run(cfg) == 0
    study = study_lib.open_study(cfg)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert complete
    out = study_lib.study_dir(cfg)
    for t in complete:
        metrics = records.read_json(out / "trials" / f"{t.number:04d}" / "metrics.json")
        assert t.value == metrics["reward"] and metrics["method"] == "grpo"
        # the study holds what the dashboard and report read: the held-out reward and KL, the curves' summaries
        assert t.user_attrs["reward"] == t.value and t.user_attrs["kl"] == metrics["kl"]
        assert t.user_attrs["train_kl_max"] == metrics["train_kl_max"]
        assert [i["step"] for i in metrics["intermediate"]] == [2, 4]  # eval_reward at each periodic eval
    assert (out / "full" / "merged").is_dir() and (out / "benchmark.json").is_file()
    assert (out / "report.md").is_file()


@pytest.mark.slow  # an SFT run, then RL from its adapter
def test_rl_continues_an_sft_adapter_which_is_the_reference(make_cfg, tiny_overrides, rl_cfg, tmp_path):
    sft_cfg = make_cfg(*tiny_overrides, "lora.targets=all_linear")
    sft_worker = train_stage.start_worker(sft_cfg)
    run.train_adapter(sft_worker, sft_cfg, tmp_path / "sft", with_baseline=False)
    cfg = rl_cfg("trainer.beta=0.01", "trainer.max_steps=2", f"trainer.init_adapter={tmp_path / 'sft' / 'adapter'}")
    worker = train_stage.start_worker(cfg)
    before = loaders.checksum(worker.base.model)
    with adapters.trainer_patches_undone(worker.base.model):
        peft_model = run._attach(worker, cfg)
        trainer = None
        try:
            trainer, _ = run._trainer(worker, peft_model, cfg, tmp_path / "probe", [], [])
            ref = {n: p for n, p in peft_model.named_parameters() if f".{dpo.REF}." in n}
            assert ref and not any(p.requires_grad for p in ref.values())  # the SFT adapter, frozen
            assert grpo.heldout_kl(peft_model, worker.base.tokenizer, ["hello"], ["world"]) == pytest.approx(0, abs=1e-6)
        finally:
            run._release(worker, trainer, peft_model)
    metrics = run.train_adapter(worker, cfg, tmp_path / "rl", with_baseline=False)
    saved = load_file(tmp_path / "rl" / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == metrics["trainable_params"]  # the reference copy is not saved
    assert metrics["rl_history"][0]["kl"] < 1e-2  # policy == reference but for LoRA dropout on the SFT adapter
    assert loaders.checksum(worker.base.model) == before


def test_a_reward_signature_is_checked_against_what_trl_passes(reward_module):
    assert rewards.problem(f"{MODULE}:letters") is None and rewards.problem("contains") is None
    assert "cannot import" in rewards.problem(f"{MODULE}:missing")  # AttributeError: no such function
    assert "has the signature" in rewards.problem("os.path:basename")  # (p): no **kwargs
    assert "has the signature" in rewards.problem("logging:log")  # (level, msg, *args, **kwargs): level is not passed
    assert "unknown reward 'exactmatch'" in rewards.problem("exactmatch")
