"""trainer=dpo on the tiny model: the DPO loss falls, the adapter learns while the shared base stays bit-identical,
the reference is that base with the adapter disabled (no second model), and a saved adapter can be continued."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lora_search.commands import train_stage
from lora_search.data.embedded_tasks import WORDS
from lora_search.models import adapters, loaders
from lora_search.train import dpo, run

DPO_FAST = ["trainer=dpo", "trainer.max_steps=12", "trainer.batch_size=4", "trainer.eval_every=6",
            "trainer.eval_subset=8", "trainer.learning_rate=1e-2", "trainer.logging_steps=1", "data.eval_fraction=0.25"]


def write_pairs(path, n: int = 48):
    """Pairs the tiny model learns in a few steps: the chosen answer repeats the word, the rejected one shouts it
    (the same length, so summed log-probabilities compare like with like)."""
    rows = [{"prompt": f"Say the word: {WORDS[i % len(WORDS)]} {i}", "chosen": f"{WORDS[i % len(WORDS)]} {i}",
             "rejected": f"{WORDS[i % len(WORDS)]} {i}".upper()} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def dpo_worker(make_cfg, tmp_path):
    cfg = make_cfg(*DPO_FAST, "data=local", f"data.path={write_pairs(tmp_path / 'pairs.jsonl')}")
    return train_stage.start_worker(cfg), cfg


def test_dpo_lowers_its_loss_and_trains_only_the_adapter(dpo_worker, tmp_path):
    worker, cfg = dpo_worker
    before = loaders.checksum(worker.base.model)
    metrics = run.train_adapter(worker, cfg, tmp_path / "run")

    assert metrics["method"] == "dpo" and metrics["steps"] == 12
    assert metrics["train_loss_first"] == pytest.approx(math.log(2), abs=0.02)  # policy == reference at step 0
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.1
    assert metrics["eval_loss"] < math.log(2) - 0.1
    assert metrics["reward_accuracy"] > 0.5 and metrics["reward_margin"] > 0
    assert metrics["preference_accuracy"] > metrics["base_preference_accuracy"]
    assert metrics["logp_margin"] > metrics["base_logp_margin"]
    assert metrics["train_tokens"] > 0
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(t) > 0 for t in lora_b)  # B starts at zero: it moved
    assert sum(t.numel() for t in adapter.values()) == metrics["trainable_params"]  # no reference copy saved
    assert loaders.checksum(worker.base.model) == before
    assert not any("lora" in name for name, _ in worker.base.model.named_modules())


def test_the_reference_is_the_base_with_the_adapter_disabled(dpo_worker, tmp_path, monkeypatch):
    """No second model is loaded or copied: TRL's reference forward runs the shared base with the adapter off."""
    import trl.trainer.dpo_trainer as dpo_trainer

    def no_second_model(*args, **kwargs):
        raise AssertionError("a reference model was loaded")

    monkeypatch.setattr(dpo_trainer, "create_model_from_path", no_second_model)
    worker, cfg = dpo_worker
    base_params = sum(p.numel() for p in worker.base.model.parameters())
    with adapters.trainer_patches_undone(worker.base.model):
        peft_model = run._attach(worker, cfg)
        trainer = None
        try:
            trainer, _ = run._trainer(worker, peft_model, cfg, tmp_path / "run", [], [])
            assert trainer.ref_model is None and dpo.REF not in peft_model.peft_config
            trainable, total = peft_model.get_nb_trainable_parameters()
            assert total == base_params + trainable  # the base once, plus one adapter
            with torch.no_grad():  # move the policy away from the base
                for name, param in peft_model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(std=0.5)
            batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(4)])
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(peft_model, batch)
            pairs = [trainer.eval_dataset[i] for i in range(4)]
            with peft_model.disable_adapter():
                base_chosen, base_rejected = dpo.pair_logps(peft_model, worker.base.tokenizer, pairs, None)
            policy_chosen, _ = dpo.pair_logps(peft_model, worker.base.tokenizer, pairs, None)
        finally:
            run._release(worker, trainer, peft_model)
    assert ref_chosen.tolist() == pytest.approx(base_chosen, rel=1e-3)  # fused LM head vs plain logits: float noise
    assert ref_rejected.tolist() == pytest.approx(base_rejected, rel=1e-3)
    assert max(abs(a - b) for a, b in zip(policy_chosen, base_chosen)) > 0.1


def test_sft_then_dpo_continues_the_sft_adapter_which_is_the_reference(make_cfg, tiny_overrides, tmp_path):
    """trainer.init_adapter: the SFT adapter is loaded trainable, TRL keeps a frozen copy as the reference, the
    base is untouched and only the continued adapter moves."""
    sft_cfg = make_cfg(*tiny_overrides)
    sft_worker = train_stage.start_worker(sft_cfg)
    run.train_adapter(sft_worker, sft_cfg, tmp_path / "sft", with_baseline=False)
    start = load_file(tmp_path / "sft" / "adapter" / "adapter_model.safetensors")

    cfg = make_cfg(*DPO_FAST, "data=local", f"data.path={write_pairs(tmp_path / 'pairs.jsonl')}",
                   f"trainer.init_adapter={tmp_path / 'sft' / 'adapter'}", "lora.r=2")
    worker = train_stage.start_worker(cfg)
    before = loaders.checksum(worker.base.model)
    with adapters.trainer_patches_undone(worker.base.model):
        peft_model = run._attach(worker, cfg)
        trainer = None
        try:
            trainer, _ = run._trainer(worker, peft_model, cfg, tmp_path / "probe", [], [])
            ref = {n: p for n, p in peft_model.named_parameters() if f".{dpo.REF}." in n}
            assert ref and not any(p.requires_grad for p in ref.values())  # the reference copy is frozen
            loaded = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if ".default." in n}
            assert set(loaded) == set(start)  # the SFT adapter's modules, loaded as saved
            assert all(torch.equal(loaded[k], v) for k, v in start.items())
            assert all(p.shape[0 if "lora_A" in n else 1] == sft_cfg.lora.r for n, p in loaded.items())  # not lora.r=2
        finally:
            run._release(worker, trainer, peft_model)
    metrics = run.train_adapter(worker, cfg, tmp_path / "dpo")
    assert 0.0 <= metrics["start_preference_accuracy"] <= 1.0  # the starting adapter's, measured before training
    assert metrics["train_loss_first"] == pytest.approx(math.log(2), abs=0.02)  # policy == the SFT reference
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    continued = load_file(tmp_path / "dpo" / "adapter" / "adapter_model.safetensors")
    assert set(continued) == set(start)  # the SFT adapter's own modules and rank, no reference copy
    assert [p.name for p in (tmp_path / "dpo" / "adapter").iterdir() if p.is_dir()] == []  # nor TRL's ref/ folder
    assert any(not torch.equal(continued[k], start[k]) for k in start)
    assert loaders.checksum(worker.base.model) == before


def test_compact_lm_head_gives_dpo_the_same_losses(dpo_worker, tmp_path):
    worker, cfg = dpo_worker
    cfg.trainer.max_steps, cfg.lora.dropout = 4, 0.0
    out = {}
    for setting in (False, True):
        cfg.trainer.compact_lm_head = setting
        out[setting] = run.train_adapter(worker, cfg, tmp_path / str(setting), with_baseline=False, save=False)
    assert out[True]["eval_loss"] == pytest.approx(out[False]["eval_loss"], rel=1e-4)
    assert out[True]["train_loss_last"] == pytest.approx(out[False]["train_loss_last"], rel=1e-4)


def test_pairs_are_scored_as_dpo_tokenizes_them(dpo_worker, tmp_path):
    """dpo.tokenize_pairs (the benchmark's) gives the ids DPOTrainer trains on."""
    worker, cfg = dpo_worker
    with adapters.trainer_patches_undone(worker.base.model):
        peft_model = run._attach(worker, cfg)
        trainer = None
        try:
            trainer, full_eval = run._trainer(worker, peft_model, cfg, tmp_path, [], [])
        finally:
            run._release(worker, trainer, peft_model)
    ours = dpo.tokenize_pairs(worker.data.eval, worker.base.tokenizer)
    theirs = [{k: full_eval[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(full_eval))]
    assert ours == theirs


def test_a_dpo_sweep_searches_beta_then_promotes_merges_and_benchmarks_on_held_out_pairs(make_cfg, tmp_path):
    """sweep=dpo_beta picks trainer=dpo itself; trials are compared on preference accuracy and pruned on the eval
    pairs' log-probability margin (beta rescales the DPO loss); the benchmark scores base and tuned on every held-out
    pair."""
    import optuna

    from lora_search.commands import pipeline
    from lora_search.core import records
    from lora_search.search import study as study_lib

    cfg = make_cfg("sweep=dpo_beta", "data=local", f"data.path={write_pairs(tmp_path / 'pairs.jsonl')}",
                   "data.eval_fraction=0.25", "sweep.n_trials=3", "trainer.learning_rate=1e-2",
                   "++sweep.space={trainer.beta: {type: float, low: 0.05, high: 0.5, log: true}}",
                   "++sweep.trial={trainer.max_steps: 6, trainer.eval_every: 3, trainer.batch_size: 4, "
                   "trainer.eval_subset: 8, trainer.final_eval: subset}",
                   "++sweep.promotion={trainer.max_steps: 12, trainer.eval_every: 0, trainer.batch_size: 4}",
                   "benchmark.latency_prompts=1", "benchmark.repeats=1", "benchmark.max_new_tokens=2",
                   "benchmark.int8_dynamic=false")
    assert (cfg.trainer.method, cfg.data.name, cfg.sweep.direction) == ("dpo", "local", "maximize")
    assert pipeline.run(cfg) == 0

    study = study_lib.open_study(cfg)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert complete and all(t.value == t.user_attrs["preference_accuracy"] for t in complete)
    for t in complete:
        assert 0 <= t.user_attrs["reward_accuracy"] <= 1 and t.user_attrs["method"] == "dpo"
        assert list(t.intermediate_values) == [3, 6]  # the eval pairs' mean log-prob margin, reported as it is
        assert t.intermediate_values[6] == pytest.approx(t.user_attrs["logp_margin"], rel=1e-3, abs=1e-3)
    out = study_lib.study_dir(cfg)
    bench = records.read_json(out / "benchmark.json")
    assert bench["settings"]["method"] == "dpo" and bench["tuned"]["preference_pairs"] == 12
    assert bench["tuned"]["preference_accuracy"] > bench["base"]["preference_accuracy"]
    assert bench["tuned"]["logp_margin"] > bench["base"]["logp_margin"]
    assert bench["tuned"]["reward_accuracy"] > 0.5 and "latency_p50_s" in bench["tuned"]
    full = records.read_json(out / "full" / "metrics.json")
    assert full["trial_metric"] == "preference_accuracy" and full["steps"] == 12
    text = (out / "report.md").read_text()
    assert "preference accuracy (held-out pairs)" in text and "reward accuracy" in text


@pytest.mark.parametrize("loss_type, first_loss", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2),
                                                   ("hinge", 1.0)])
def test_the_loss_type_takes_effect(dpo_worker, tmp_path, loss_type, first_loss):
    """At step 0 the policy is the reference (margin 0), so each loss starts at its own value there: -log sigmoid(0),
    IPO's (1 / (2 beta))^2, the hinge's 1."""
    worker, cfg = dpo_worker
    cfg.trainer.loss_type, cfg.trainer.beta, cfg.trainer.max_steps = loss_type, 0.1, 3
    metrics = run.train_adapter(worker, cfg, tmp_path / loss_type, with_baseline=False, save=False)
    assert metrics["train_loss_first"] == pytest.approx(first_loss, rel=0.02)
    assert math.isfinite(metrics["eval_loss"])


def test_a_diverging_dpo_trial_is_stopped_with_its_reason(dpo_worker, tmp_path):
    import optuna

    from lora_search.train.pruning import PruningCallback, TrialStopped

    worker, cfg = dpo_worker
    cfg.trainer.learning_rate, cfg.trainer.max_grad_norm, cfg.trainer.max_steps = 1e8, 1e12, 12
    trial = optuna.create_study(direction="maximize").ask()
    callback = PruningCallback(trial, "eval_rewards/accuracies", maximize=True)
    before = loaders.checksum(worker.base.model)
    with pytest.raises(TrialStopped, match="diverged"):
        run.train_adapter(worker, cfg, tmp_path / "nan", callbacks=[callback], with_baseline=False, save=False)
    assert loaders.checksum(worker.base.model) == before


def test_init_adapter_takes_a_study_name_or_a_folder(tmp_path):
    """README: `trainer.init_adapter=rank_lr` reads results/rank_lr/full/adapter; a folder is taken as it is."""
    from lora_search.models.adapters import init_adapter_dir

    promoted = tmp_path / "results" / "rank_lr" / "full" / "adapter"
    promoted.mkdir(parents=True)
    (promoted / "adapter_config.json").write_text("{}")
    assert init_adapter_dir("rank_lr", str(tmp_path / "results")) == (promoted, None)
    assert init_adapter_dir(str(promoted), "elsewhere") == (promoted, None)
    folder, problem = init_adapter_dir(str(tmp_path), str(tmp_path / "results"))
    assert folder is None and "without adapter_config.json" in problem


def test_a_sweep_file_picks_its_groups_unless_the_command_line_does(make_cfg):
    """README: a sweep file may pick config groups (`groups: {trainer: dpo}`): sweep=dpo_beta alone composes a DPO
    run on the embedded preference task; a group on the command line wins."""
    cfg = make_cfg("sweep=dpo_beta")
    assert (cfg.trainer.name, cfg.data.name, cfg.sweep.metric) == ("dpo", "embedded_preference", "preference_accuracy")
    assert make_cfg("sweep=dpo_beta", "data=local", "data.path=x.jsonl").data.name == "local"
    assert make_cfg().trainer.name == "sft"  # the default sweep picks nothing


def test_stage_train_with_dpo_writes_the_run_folder(make_cfg, tmp_path, caplog):
    import logging

    cfg = make_cfg(*DPO_FAST, "stage=train", "run_name=dpo", "data=local",
                   f"data.path={write_pairs(tmp_path / 'pairs.jsonl')}")
    with caplog.at_level(logging.INFO, logger="lora_search"):
        run_dir = train_stage.train_stage(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    assert metrics["preference_accuracy"] > metrics["base_preference_accuracy"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert any("preference accuracy" in r.getMessage() and "(base" in r.getMessage() for r in caplog.records)
