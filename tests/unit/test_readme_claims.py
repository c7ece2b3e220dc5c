"""Small claims of the README and docs/, each backed here: alpha tied to rank, one worker per GPU, secret-named
config keys masked, $LORA_SEARCH_CACHE moving the model cache; and the docs themselves: a README under 250 lines
whose map lists every page, pages that open with a one-line summary, relative links that resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lora_search.config.schema import LoraSpec
from lora_search.core import records
from lora_search.models import adapters, loaders
from lora_search.scale import workers


def test_alpha_ratio_sets_alpha_to_ratio_times_rank(make_cfg):
    """docs/sweeps.md: `lora.alpha_ratio: ... # alpha = ratio * r`."""
    model = make_cfg().model
    assert adapters.lora_config(LoraSpec(r=8, alpha_ratio=2), model).lora_alpha == 16
    assert adapters.lora_config(LoraSpec(r=32, alpha_ratio=0.5), model).lora_alpha == 16
    assert adapters.lora_config(LoraSpec(r=8, alpha=12.0), model).lora_alpha == 12.0  # no ratio: alpha as given


def test_workers_get_one_gpu_each_and_otherwise_share_the_cores(monkeypatch):
    """docs/scale-out.md: `sweep.workers=N` runs N workers (one per GPU where there are GPUs)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(workers, "_visible_gpus", lambda: ["0", "1"])
    assert [workers.worker_env(i, 2)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["0", "1"]
    assert [workers.worker_env(i, 3)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]  # more workers: shared
    assert "OMP_NUM_THREADS" not in workers.worker_env(1, 2)  # a GPU worker's cores are not split

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(workers, "_visible_gpus", lambda: [])
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 8)
    envs = [workers.worker_env(i, 4) for i in range(4)]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["2"] * 4
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in envs)
    assert workers.worker_env(0, 16)["OMP_NUM_THREADS"] == "1"  # never 0 threads


def test_a_secret_named_key_is_masked_in_the_config_records(make_cfg, tmp_path):
    """docs/tracking-and-reports.md: secrets are replaced by *** in every record; a free-form key named like a
    token is one."""
    cfg = make_cfg("+model.tiny.api_token=abc123", "+model.tiny.db_password=hunter2x")
    assert cfg.model.tiny["api_token"] == "abc123"  # the run itself still gets the value
    data = records.config_dict(cfg)
    assert data["model"]["tiny"]["api_token"] == "***" and data["model"]["tiny"]["db_password"] == "***"
    assert data["model"]["tiny"]["hidden_size"] == cfg.model.tiny["hidden_size"]  # other keys untouched
    records.write_config(tmp_path / "config.yaml", cfg)
    text = (tmp_path / "config.yaml").read_text()
    assert "abc123" not in text and "hunter2x" not in text
    assert yaml.safe_load(text)["model"]["tiny"]["api_token"] == "***"


def test_lora_search_cache_moves_the_model_cache(make_cfg, monkeypatch, tmp_path):
    """docs/configuration.md: the converted copy lives under ~/.cache/lora_search/models/ (`LORA_SEARCH_CACHE` or `cache_dir=`
    move it)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LORA_SEARCH_CACHE", raising=False)
    assert loaders.cache_root(None) == tmp_path / "home" / ".cache" / "lora_search"
    monkeypatch.setenv("LORA_SEARCH_CACHE", str(tmp_path / "moved"))
    assert loaders.cache_root(None) == tmp_path / "moved"
    assert loaders.cache_root(str(tmp_path / "given")) == tmp_path / "given"  # cache_dir= wins over the variable

    cfg = make_cfg()
    folder = Path(loaders.local_copy(cfg.model, None))  # as with cache_dir unset
    assert folder.parent == tmp_path / "moved" / "models" and (folder / "config.json").exists()
    assert not (tmp_path / "home").exists()


ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def _prose(path: Path) -> str:
    """A page's text without its fenced code blocks and inline code (a link shown as code is not a link)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_the_readme_is_short_and_maps_every_docs_page():
    """README: a newcomer reads it in five minutes (under 250 lines); its docs map lists every page in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    for page in DOCS:
        assert f"](docs/{page.name})" in readme, f"the README's docs map does not list docs/{page.name}"
    assert "make sweep" in readme and "make test" in readme  # the two commands


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_docs_page_opens_with_a_one_line_summary(page):
    first = page.read_text().splitlines()[0]
    assert first.startswith("# ") and ": " in first, f"docs/{page.name} must open with '# Topic: what it says'"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    """Links between pages are relative and point at files (or folders) that exist; none reaches outside the
    repository (no ../shared)."""
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http(s)://, mailto:
            continue
        path, _, anchor = target.partition("#")
        assert not path.startswith("/"), f"{page.name}: {target} is absolute; links must be relative"
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} points outside the repository"
        assert resolved.exists(), f"{page.name}: {target} points at nothing"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: {target}: no such heading in {resolved.name}"
