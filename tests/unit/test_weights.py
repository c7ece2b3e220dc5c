"""The LoRA weight analysis: a real PEFT adapter with known update matrices, its norms and effective ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_search.promote import weights
from lora_search.report import weights_section

TINY = Path(__file__).resolve().parents[2] / "lora_search" / "conf" / "model" / "tiny_llama.yaml"


def _base_model():
    """The tests' tiny Llama-shaped model (conf/model/tiny_llama.yaml), random weights."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(TINY))["tiny"].items() if k != "seed"}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, **tiny))


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A rows x cols matrix with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g))[0]


def _factors(out: int, inp: int, r: int, singular: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A = U diag(singular) V^T: an update with exactly these singular values (padded with 0)."""
    s = torch.tensor(singular + [0.0] * (r - len(singular)))
    return _orthonormal(inp, r, seed).T.contiguous(), _orthonormal(out, r, seed + 1) * s


def _lora(model, layer: int, module: str):
    attn = model.base_model.model.model.layers[layer].self_attn
    return getattr(attn, module)


def make_adapter(folder: Path, updates: dict, r: int = 8, alpha: int = 8, **lora_kwargs) -> Path:
    """Save a PEFT adapter on the tiny model; updates: (layer, module) -> (A, B) or a list of singular values."""
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    model = get_peft_model(_base_model(), LoraConfig(r=r, lora_alpha=alpha, **lora_kwargs))
    with torch.no_grad():
        for (layer, module), update in updates.items():
            target = _lora(model, layer, module)
            rank = target.lora_A["default"].weight.shape[0]
            a, b = (update if isinstance(update, tuple) else
                    _factors(target.out_features, target.in_features, rank, update, seed=10 * layer + len(module)))
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)
    model.save_pretrained(folder)
    return folder


def _entry(analysis: dict, layer, module: str) -> dict:
    (found,) = [e for e in analysis["entries"] if e["layer"] == layer and e["module"] == module]
    return found


# layer 0 q_proj: exactly rank 2 (equal values); layer 1 v_proj: full rank 8, equal values; layer 0 v_proj: rank 1;
# layer 1 q_proj: untouched (PEFT's init: B = 0, no update)
KNOWN = {(0, "q_proj"): [1.0, 1.0], (1, "v_proj"): [0.5] * 8, (0, "v_proj"): [3.0]}


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    folder = make_adapter(tmp_path_factory.mktemp("known") / "adapter", KNOWN)
    return folder, weights.analyze(folder)


def test_effective_rank_counts_the_singular_values_holding_90_percent_of_the_energy(known):
    _, analysis = known
    assert _entry(analysis, 0, "q_proj")["effective_rank"] == 2
    assert _entry(analysis, 1, "v_proj")["effective_rank"] == 8  # 7 of 8 equal values hold 87.5% < 90%
    assert _entry(analysis, 0, "v_proj")["effective_rank"] == 1
    untouched = _entry(analysis, 1, "q_proj")
    assert untouched["effective_rank"] == 0 and untouched["norm"] == 0
    assert analysis["layers"] == [0, 1] and sorted(analysis["modules"]) == ["q_proj", "v_proj"]
    assert all(e["r"] == 8 == analysis["r"] for e in analysis["entries"])


def test_the_energy_rule_at_its_boundary():
    assert weights.effective_rank([3.0, 1.0]) == 1  # 9 of 10: exactly 90%
    assert weights.effective_rank([2.9, 1.0]) == 2  # 8.41 of 9.41: below 90%
    assert weights.effective_rank([0.0, 0.0]) == 0


def test_norm_and_singular_values_match_the_full_update_matrix(tmp_path):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 128, generator=g), torch.randn(128, 8, generator=g)
    adapter = make_adapter(tmp_path / "adapter", {(0, "q_proj"): (a, b)}, alpha=16)
    entry = _entry(weights.analyze(adapter), 0, "q_proj")
    full = 2.0 * b.double() @ a.double()  # alpha 16 / r 8
    assert entry["scaling"] == pytest.approx(2.0)
    assert entry["norm"] == pytest.approx(float(torch.linalg.matrix_norm(full)), rel=1e-6)
    assert entry["top_singular_value"] == pytest.approx(float(torch.linalg.svdvals(full)[0]), rel=1e-6)
    expected = weights.effective_rank(torch.linalg.svdvals(full).tolist())
    assert entry["effective_rank"] == expected


def test_scaling_follows_lora_alpha_and_rslora(tmp_path):
    plain = weights.analyze(make_adapter(tmp_path / "plain", KNOWN, alpha=8))
    doubled = weights.analyze(make_adapter(tmp_path / "doubled", KNOWN, alpha=16))
    rslora = weights.analyze(make_adapter(tmp_path / "rslora", KNOWN, alpha=8, use_rslora=True))
    for layer, module in KNOWN:
        base = _entry(plain, layer, module)["norm"]
        assert _entry(doubled, layer, module)["norm"] == pytest.approx(2 * base)
        assert _entry(rslora, layer, module)["norm"] == pytest.approx(math.sqrt(8) * base)  # alpha/sqrt(r)
        assert _entry(rslora, layer, module)["effective_rank"] == _entry(plain, layer, module)["effective_rank"]


def test_rank_and_alpha_patterns_are_honoured(tmp_path):
    adapter = make_adapter(tmp_path / "adapter", {(1, "v_proj"): [1.0] * 4, (0, "v_proj"): [1.0]},
                           rank_pattern={"layers.1.self_attn.v_proj": 4}, alpha_pattern={"layers.0.self_attn.v_proj": 32})
    analysis = weights.analyze(adapter)
    patterned = _entry(analysis, 1, "v_proj")
    assert patterned["r"] == 4 and patterned["effective_rank"] == 4
    assert patterned["scaling"] == pytest.approx(8 / 4)  # lora_alpha over the pattern's rank
    assert _entry(analysis, 0, "v_proj")["scaling"] == pytest.approx(32 / 8)
    assert _entry(analysis, 0, "v_proj")["norm"] == pytest.approx(4.0, rel=1e-5)


def test_a_smaller_rank_is_suggested_only_when_every_update_is_well_below_r(tmp_path, known):
    low = weights.analyze(make_adapter(tmp_path / "low", {(0, "q_proj"): [1.0, 1.0], (1, "v_proj"): [2.0]}))
    assert low["summary"]["effective_rank_max"] == 2
    assert low["summary"]["suggested_r"] == 2
    assert "r=2" in low["summary"]["suggestion"] and "r=8" in low["summary"]["suggestion"]
    assert any("r=2 would likely do" in line for line in weights_section.report_lines(low))

    _, full = known  # layer 1 v_proj uses all 8
    assert full["summary"]["suggested_r"] is None and full["summary"]["suggestion"] is None
    assert not any("would likely do" in line for line in weights_section.report_lines(full))

    untrained = weights.analyze(make_adapter(tmp_path / "untrained", {}))  # all zero: nothing to judge a rank by
    assert untrained["summary"]["suggested_r"] is None


def test_summary_shares_and_module_norms(known):
    _, analysis = known
    s = analysis["summary"]
    ranks = sorted(e["effective_rank"] for e in analysis["entries"])  # 0, 1, 2, 8
    assert s["effective_rank_max"] == ranks[-1]
    assert s["share_rank_le_quarter"] == pytest.approx(sum(k <= 2 for k in ranks) / len(ranks))
    v = [e["norm"] for e in analysis["entries"] if e["module"] == "v_proj"]
    assert s["norm_by_module"]["v_proj"] == pytest.approx(math.sqrt(sum(n * n for n in v)))
    assert s["norm_total"] == pytest.approx(math.sqrt(sum(e["norm"] ** 2 for e in analysis["entries"])))


def test_missing_or_broken_adapters_are_skipped(tmp_path):
    assert weights.analyze(tmp_path / "nowhere") is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")
    assert weights.analyze(broken) is None
    assert weights.write(broken, tmp_path / "weights.json", tmp_path / "plots") is None
    assert not (tmp_path / "weights.json").exists()


def test_embedding_lora_and_modules_to_save_are_handled(tmp_path):
    adapter = make_adapter(tmp_path / "adapter", {(0, "q_proj"): [1.0]},
                           target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    analysis = weights.analyze(adapter)
    assert "lm_head" not in analysis["modules"]  # a full copy, not a LoRA update
    embedding = _entry(analysis, None, "embed_tokens")
    assert embedding["norm"] == 0 and embedding["effective_rank"] == 0  # PEFT starts embedding B at zero too
    assert analysis["layers"] == [0, 1]
    assert weights.heatmap(analysis, tmp_path / "h.png", "norm").stat().st_size > 0


def test_write_draws_heatmaps_and_the_report_and_wandb_read_them(tmp_path, known):
    from PIL import Image

    adapter, _ = known
    analysis = weights.write(adapter, tmp_path / "weights.json", tmp_path / "plots")
    saved = json.loads((tmp_path / "weights.json").read_text())
    assert len(saved["entries"]) == len(analysis["entries"]) == 4
    assert set(analysis["plots"]) == {"effective_rank", "norm"}
    for name in analysis["plots"].values():
        with Image.open(tmp_path / "plots" / name) as image:
            width, height = image.size
            assert image.format == "PNG" and 150 < width < 3000 and 150 < height < 3000

    lines = weights_section.report_lines(saved, "plots")
    text = "\n".join(lines)
    assert lines[0] == "## What the adapter learned"
    assert "Across 2 layers x 2 modules" in text and "of r=8" in text
    for name in analysis["plots"].values():
        image_line = next(i for i, line in enumerate(lines) if line.startswith("![") and f"(plots/{name})" in line)
        assert lines[image_line + 1].startswith("*") and lines[image_line + 1].endswith("*")
    table_rows = [line for line in lines if line.startswith("| ") and not line.startswith("| module")]
    assert sorted(row.split("|")[1].strip() for row in table_rows) == ["q_proj", "v_proj"]

    summary = weights.wandb_summary(saved)
    assert summary and all(k.startswith("weights/") for k in summary)
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in summary.values())
    assert summary["weights/effective_rank_max"] == 8 and "weights/suggested_r" not in summary
    assert summary["weights/v_proj/norm_max"] == pytest.approx(max(
        e["norm"] for e in analysis["entries"] if e["module"] == "v_proj"))
