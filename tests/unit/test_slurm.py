"""SLURM through Hydra's submitit launcher: the shipped conf/hydra/launcher/*.yaml, rendered to the sbatch script by
submitit's own code, the way hydra-submitit-launcher builds its executor, with `sbatch` and `srun` stand-ins on PATH
(no cluster needed: the stand-in sbatch keeps the script it is given and answers with a job id)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")

REPO = Path(__file__).resolve().parents[2]
SBATCH = """#!/bin/sh
# stand-in for sbatch: keep the submitted script, answer the way sbatch does (or refuse: FAKE_SBATCH_RC=1)
cp "$1" "$FAKE_SBATCH_DIR/$(date +%s%N).sh"
if [ "${FAKE_SBATCH_RC:-0}" != 0 ]; then echo "sbatch: error: stand-in refuses" >&2; exit "$FAKE_SBATCH_RC"; fi
echo "Submitted batch job 4242"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`sbatch` and `srun` stand-ins on PATH; returns the folder the submitted scripts are copied to."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    kept.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # SlurmExecutor only checks that srun is on PATH
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_DIR", str(kept))
    return kept


def launcher_config(tmp_path, *overrides):
    """The hydra.launcher node composed from conf/ (lora_search's config dir and sweep group)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lora_search.config import compose as lora_compose

    lora_compose.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(lora_compose.conf_dir()), version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True,
                          overrides=[f"results_dir={tmp_path / 'results'}", *overrides])
    finally:
        GlobalHydra.instance().clear()
    return cfg


def executor_for(launcher_cfg):
    """The executor hydra-submitit-launcher builds (BaseSubmititLauncher.__init__ and .launch, 1.2.0): the launcher
    instantiated from the config, its params split into AutoExecutor's init and update_parameters."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    launcher = instantiate(launcher_cfg)
    cluster, params = launcher._EXECUTOR, dict(launcher.params)
    init_keys = {"max_num_timeout", "submitit_folder"}
    executor = submitit.AutoExecutor(
        folder=params["submitit_folder"], cluster=cluster,
        **{f"{cluster}_{k}": v for k, v in params.items() if k == "max_num_timeout"})
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{cluster}_{k}": v for k, v in params.items()
                                  if k not in init_keys})
    return executor, params


def sbatch_script(tmp_path, kept: Path, *overrides, jobs: int = 1, launcher: str = "slurm") -> str:
    """The sbatch script submitit submits for `jobs` Hydra jobs (one: a single job, several: an array, as the
    launcher's map_array does)."""
    executor, _ = executor_for(launcher_config(tmp_path, f"hydra/launcher={launcher}", *overrides).hydra.launcher)
    before = set(kept.iterdir())
    if jobs == 1:
        executor.submit(int, "1")
    else:
        executor.map_array(int, [str(i) for i in range(jobs)])
    (script,) = set(kept.iterdir()) - before
    return script.read_text()


def sbatch_lines(script: str) -> set[str]:
    return {line for line in script.splitlines() if line.startswith("#SBATCH")}


def test_slurm_launcher_extends_the_plugins_submitit_slurm(tmp_path):
    cfg = launcher_config(tmp_path, "hydra/launcher=slurm")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task) == (1, 1, 8)
    assert (launcher.mem_gb, launcher.timeout_min, launcher.partition) == (64, 240, None)
    assert launcher.signal_delay_s == 120 and launcher.qos is None  # the plugin's keys and defaults are kept
    assert launcher.name == "lora_search-rank_lr"  # the study's name
    assert launcher.submitit_folder == f"{tmp_path / 'results'}/rank_lr/submitit/%j"  # under results/<study>/
    other = launcher_config(tmp_path, "hydra/launcher=slurm", "sweep=dpo_beta").hydra.launcher
    assert other.name == "lora_search-dpo_beta" and "/dpo_beta/submitit/" in other.submitit_folder


def test_sbatch_script_asks_one_gpu_8_cpus_64gb_240_minutes(tmp_path, fake_slurm):
    script = sbatch_script(tmp_path, fake_slurm)
    lines = sbatch_lines(script)
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --time=240",
                 "#SBATCH --job-name=lora_search-rank_lr"):
        assert line in lines, script
    assert not any(line.startswith(("#SBATCH --partition", "#SBATCH --array")) for line in lines), script
    assert f"{tmp_path / 'results'}/rank_lr/submitit/" in script  # --output/--error under results/<study>/submitit/


def test_command_line_overrides_change_the_sbatch_lines(tmp_path, fake_slurm):
    lines = sbatch_lines(sbatch_script(tmp_path, fake_slurm, "hydra.launcher.partition=gpu",
                                       "hydra.launcher.timeout_min=30", "hydra.launcher.cpus_per_task=4",
                                       "hydra.launcher.mem_gb=32", "hydra.launcher.gpus_per_node=2"))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=32GB",
                 "#SBATCH --gpus-per-node=2"):
        assert line in lines
    assert "#SBATCH --time=240" not in lines and "#SBATCH --cpus-per-task=8" not in lines


def test_gres_instead_of_gpus_per_node_and_extra_sbatch_flags(tmp_path, fake_slurm):
    """Clusters without --gpus-per-node: gres; any other flag through additional_parameters (`++`: the mapping is
    empty in the plugin's config)."""
    lines = sbatch_lines(sbatch_script(tmp_path, fake_slurm, "hydra.launcher.gpus_per_node=null",
                                       "hydra.launcher.gres=gpu:1", "hydra.launcher.account=myproj",
                                       "++hydra.launcher.additional_parameters={mail-type: END}"))
    assert {"#SBATCH --gres=gpu:1", "#SBATCH --account=myproj", "#SBATCH --mail-type=END"} <= lines
    assert not any(line.startswith("#SBATCH --gpus-per-node") for line in lines)


def test_workers_of_a_multirun_become_one_array(tmp_path, fake_slurm):
    """worker=range(4) makes 4 Hydra jobs: one sbatch array of 4 tasks, all at once unless capped."""
    cap = launcher_config(tmp_path, "hydra/launcher=slurm").hydra.launcher.array_parallelism
    lines = sbatch_lines(sbatch_script(tmp_path, fake_slurm, jobs=4))
    assert f"#SBATCH --array=0-3%{min(4, cap)}" in lines and "#SBATCH --array=0-3%4" in lines
    lines = sbatch_lines(sbatch_script(tmp_path, fake_slurm, "hydra.launcher.array_parallelism=2", jobs=4))
    assert "#SBATCH --array=0-3%2" in lines


def test_slurm_cpu_asks_no_gpu(tmp_path, fake_slurm):
    script = sbatch_script(tmp_path, fake_slurm, launcher="slurm_cpu")
    flags = {line.split("=")[0] for line in sbatch_lines(script)}
    assert not any("gpu" in flag or "gres" in flag for flag in flags), script
    assert "#SBATCH --cpus-per-task=8" in script


def test_local_launcher_composes_to_the_plugins_local_launcher(tmp_path):
    launcher = launcher_config(tmp_path, "hydra/launcher=local").hydra.launcher
    assert launcher._target_.endswith("LocalLauncher")
    assert launcher.name == "lora_search-rank_lr" and launcher.gpus_per_node == 1
    executor, params = executor_for(launcher)
    assert executor.cluster == "local" and params["submitit_folder"].endswith("/rank_lr/submitit/%j")
    assert executor._executor.parameters["gpus_per_node"] == 1


def test_cli_accepts_the_slurm_launcher_and_prints_it(tmp_path):
    """`--cfg hydra` through lora_search's own command line (its override checks run first): Hydra cannot combine it
    with -m, so without worker=range(N)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lora_search", "stage=search", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
         f"results_dir={tmp_path}", "--cfg", "hydra"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("gpus_per_node: 1", "cpus_per_task: 8", "mem_gb: 64", "timeout_min: 240", "partition: gpu",
                 "hydra/launcher: slurm", "SlurmLauncher"):
        assert line in proc.stdout, proc.stdout
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # the whole command: lora_search, Hydra's multirun, the launcher pickled and "submitted"
def test_multirun_through_the_cli_submits_one_array_per_sweep(tmp_path, fake_slurm):
    """`python -m lora_search -m stage=search hydra/launcher=slurm sweep.workers=3 sweep.storage=postgresql...`: the
    array's size comes from sweep.workers; the stand-in sbatch receives one array script of 3 tasks, then refuses it
    (a stand-in cannot run the jobs, and the launcher would wait for them), so the command fails after the
    submission: the script is what is checked."""
    proc = subprocess.run(
        [sys.executable, "-m", "lora_search", "-m", "stage=search", "hydra/launcher=slurm", "sweep.workers=3",
         "sweep.storage=postgresql+psycopg://lora@db.example/lora_search",
         "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30", f"results_dir={tmp_path / 'results'}",
         "tracking=none"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "FAKE_SBATCH_RC": "1"})
    assert proc.returncode != 0 and "stand-in refuses" in proc.stderr, proc.stderr[-3000:]
    scripts = list(fake_slurm.iterdir())
    assert len(scripts) == 1, proc.stderr[-3000:]
    script = scripts[0].read_text()
    lines = sbatch_lines(script)
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --time=30",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --job-name=lora_search-rank_lr"):
        assert line in lines, script
    assert f"{tmp_path / 'results'}/rank_lr/submitit/" in script
    assert "submitit.core._submit" in script


def test_sweep_workers_becomes_the_array_and_sqlite_is_refused_on_a_cluster():
    from lora_search.checks.overrides import launcher_jobs
    from lora_search.core.errors import ConfigError

    pg = "sweep.storage=postgresql+psycopg://u@db/x"
    assert launcher_jobs(["-m", "hydra/launcher=slurm", "sweep.workers=8", pg]) == \
        ["-m", "hydra/launcher=slurm", "sweep.workers=1", pg, "worker=range(8)"]
    assert launcher_jobs(["-m", "hydra/launcher=slurm", "worker=range(4)", pg]) == \
        ["-m", "hydra/launcher=slurm", "worker=range(4)", pg]  # an explicit worker sweep is kept
    assert launcher_jobs(["sweep.workers=8"]) == ["sweep.workers=8"]  # one machine: worker processes, as before
    with pytest.raises(ConfigError) as info:
        launcher_jobs(["-m", "hydra/launcher=slurm", "worker=range(4)"])
    assert "SQLite" in str(info.value) and "journal://" in str(info.value) and "postgresql" in str(info.value)
    # the local launcher keeps every job on this machine: SQLite is fine there
    assert launcher_jobs(["-m", "hydra/launcher=submitit_local", "sweep.workers=2"])[-1] == "worker=range(2)"


def test_the_cli_refuses_sqlite_for_slurm_workers_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lora_search", "-m", "stage=search", "hydra/launcher=slurm",
                           "worker=range(4)", f"results_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "LORA_SEARCH_STORAGE"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "several machines" in proc.stderr
    assert not any(tmp_path.iterdir())
