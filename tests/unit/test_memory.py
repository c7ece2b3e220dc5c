"""The peak-memory estimate on the tiny model: its LoRA part is PEFT's parameter count x 16 bytes, its base part the
loaded model's bytes, its activation part the bytes autograd really saves, and it moves the right way with every
knob. How close it comes to a run's recorded peak is measured by benchmarks/memory_estimate.py (a pytest process's
RSS holds every earlier test's leftovers, so that comparison is not made here)."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_search.models import adapters, loaders, memory

MB = 2**20


@pytest.fixture
def tiny(make_cfg):
    """(cfg, arch) for the tiny model with extra overrides."""
    def make(*overrides):
        cfg = make_cfg(*overrides)
        return cfg, loaders.architecture(cfg.model, cfg.cache_dir)
    return make


def changed(cfg, **dotted):
    """A copy of cfg with dotted keys (trainer__batch_size=16 for trainer.batch_size) set: no Hydra compose."""
    cfg = copy.deepcopy(cfg)
    for key, value in dotted.items():
        group, name = key.split("__")
        setattr(getattr(cfg, group), name, value)
    return cfg


@pytest.mark.parametrize("overrides", [
    ["lora.r=4", "lora.targets=qv"],
    ["lora.r=16", "lora.targets=all_linear", "lora.bias=lora_only"],
    ["lora.r=8", "lora.targets=mlp", "lora.use_dora=true", "lora.layers_to_transform=[1]"],
    ["lora.r=8", "lora.targets=attn", "+lora.rank_pattern.q_proj=32", "lora.modules_to_save=[lm_head]"],
])
def test_lora_part_is_16_bytes_per_parameter_peft_counts(tiny, overrides):
    cfg, arch = tiny(*overrides)
    trainable, _ = adapters.count_parameters(cfg.lora, cfg.model, loaders.meta_model(arch))
    assert memory.lora_parameters(cfg, arch) == trainable
    est = memory.estimate(cfg, arch, "cpu")
    assert est.parts["lora"] * MB == pytest.approx(16 * trainable)  # fp32 weight, gradient, two AdamW states


def test_optimizer_state_follows_trainer_optim(tiny):
    cfg, arch = tiny()
    lora = {optim: memory.estimate(changed(cfg, trainer__optim=optim), arch, "cpu").parts["lora"]
            for optim in ("adamw_torch", "adamw_8bit", "sgd")}
    assert lora["sgd"] < lora["adamw_8bit"] < lora["adamw_torch"]


def test_estimate_grows_with_rank_batch_and_length_and_shrinks_with_checkpointing(tiny):
    cfg, arch = tiny("trainer.max_steps=10")

    def total(device="cpu", seq_len=None, completion_len=None, **dotted):
        return memory.estimate(changed(cfg, **dotted), arch, device, seq_len, completion_len).total_mb

    for device in ("cpu", "cuda"):  # a CUDA estimate needs no GPU: it is arithmetic on the config
        base = total(device)
        assert total(device, lora__r=64) > total(device, lora__r=16) > base
        assert total(device, trainer__batch_size=16) > base > total(device, trainer__batch_size=2)
        assert total(device, trainer__max_length=512) > base > total(device, trainer__max_length=64)
        assert total(device, trainer__gradient_checkpointing=True) < base
        assert total(device, completion_len=8, trainer__compact_lm_head=False) > total(device, completion_len=8)
        # DPO: a chosen and a rejected row for every pair in the batch
        assert total(device, trainer__method="dpo") > base
    # rows shorter than max_length: the batch is padded to its longest row only
    assert total(seq_len=40) < total() and total(seq_len=10_000) == total()
    assert total(completion_len=8) < total()  # compact_lm_head: only completion positions are scored
    assert total(completion_len=8, trainer__compact_lm_head=False) == total(trainer__compact_lm_head=False)


def test_parts_sum_to_the_total_and_describe_names_them(tiny):
    for overrides in ([], ["quant=nf4", "trainer.gradient_checkpointing=true"], ["trainer=dpo"]):
        cfg, arch = tiny(*overrides)
        for device in ("cpu", "cuda"):
            est = memory.estimate(cfg, arch, device)
            assert sum(est.parts.values()) == pytest.approx(est.total_mb)
            assert all(v >= 0 for v in est.parts.values()), est.parts
            line = est.describe()
            assert line.startswith(f"{est.total_mb:.0f} MB (") and all(name in line for name in est.parts)
            assert est.parts["base_weights"] >= memory.base_mb(cfg, arch, device)
            assert (est.parts["runtime"] > 0) == (device == "cpu")


def _loaded_bytes(model: torch.nn.Module) -> int:
    """Parameters, buffers and bitsandbytes' quantization constants of a loaded model, each storage once."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if getattr(state, "state2", None) is not None:
                tensors += [state.state2.absmax, state.state2.code]
        if getattr(weight, "SCB", None) is not None:
            tensors.append(weight.SCB)
    return sum(s.nbytes() for s in {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}.values())


def test_base_weights_by_quant_mode_match_the_loaded_model(tiny):
    pytest.importorskip("bitsandbytes")
    sizes = {}
    for mode, extra in (("none", []), ("int8", []), ("nf4", []), ("nf4", ["quant.double_quant=false"]),
                        ("int8", ["quant.skip_modules=[lm_head,down_proj]"])):
        cfg, arch = tiny(f"quant={mode}", *extra)
        sizes[mode, *extra] = memory.base_mb(cfg, arch, "cpu")
        base = loaders.load_base(cfg.model, cfg.quant, cfg.cache_dir)
        assert sizes[mode, *extra] == pytest.approx(_loaded_bytes(base.model) / MB, rel=0.03), (mode, extra)
    assert sizes["nf4",] < sizes["int8",] < sizes["none",]
    assert sizes["int8", "quant.skip_modules=[lm_head,down_proj]"] > sizes["int8",]  # down_proj kept in fp32


def test_activation_part_is_what_autograd_saves(tiny):
    """The bytes a real forward of the adapted tiny model saves for backward (saved_tensors_hooks, each storage
    once), against the estimate's activations part, in fp32 and under CPU bf16 autocast."""
    for precision in ("fp32", "bf16"):
        cfg, arch = tiny(f"trainer.precision={precision}", "trainer.batch_size=4", "lora.targets=all_linear")
        base = loaders.load_base(cfg.model, cfg.quant, cfg.cache_dir)
        model = adapters.attach(base.model, cfg.lora, cfg.model)
        model.train()
        rows, length = cfg.trainer.batch_size, 48
        ids = torch.randint(3, 200, (rows, length))
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0  # a padded row: the attention mask path, as in a real batch
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.base_model.model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        est = memory.estimate(cfg, arch, "cpu", seq_len=length)
        assert est.parts["activations"] == pytest.approx(sum(saved.values()) / MB, rel=0.10), precision
        adapters.detach(model)


@pytest.mark.parametrize("exc, oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 123 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)"), False),
    (ValueError("out of memory"), False),
    (KeyError("completion"), False),
])
def test_is_out_of_memory(exc, oom):
    assert memory.is_out_of_memory(exc) is oom


def test_auto_budget_is_free_memory_plus_own_rss():
    import psutil

    budget = memory.auto_budget_mb("cpu")
    rss = psutil.Process().memory_info().rss / MB
    assert rss < budget <= psutil.virtual_memory().total / MB + rss


def test_estimate_reads_the_architecture_once(tiny, monkeypatch):
    cfg, arch = tiny()
    built = []
    monkeypatch.setattr(memory, "_cache", {})  # earlier tests may have read this architecture already
    monkeypatch.setattr(memory, "meta_model", lambda arch: built.append(arch) or loaders.meta_model(arch))
    lora_mb = []
    for r in (4, 8, 16):
        cfg.lora.r = r
        lora_mb.append(memory.estimate(cfg, arch, "cpu").parts["lora"])
    assert len(built) == 1  # the module tree was built for the first estimate only
    assert lora_mb[0] < lora_mb[1] < lora_mb[2]  # and every estimate still used its own rank
