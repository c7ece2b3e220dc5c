"""examples/k8s/: the manifests parse, are wired together (Secret -> env, PVC -> results volume, Indexed Job), and
each container's command is one the CLI accepts: composed and pre-run checked in-process as `main()` does, with
nothing trained and no Kubernetes or PostgreSQL needed."""

from __future__ import annotations

import posixpath
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lora_search.core.errors import LoraSearchError

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "examples" / "k8s"
INDEX = 3  # the completion index substituted for $JOB_COMPLETION_INDEX
SHELLS = ("sh", "/bin/sh", "bash", "/bin/bash")
INDEX_VAR = re.compile(r"\$(\{JOB_COMPLETION_INDEX\}|\(JOB_COMPLETION_INDEX\)|JOB_COMPLETION_INDEX\b)")


def manifests() -> list[tuple[str, dict]]:
    """(file name, document) for every document of every examples/k8s/*.yaml."""
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def jobs() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in of_kind("Job")}


def search_job() -> dict:
    indexed = [job for job in jobs().values() if job["spec"].get("completionMode") == "Indexed"]
    assert len(indexed) == 1, "expected one Indexed Job (the search)"
    return indexed[0]


def containers() -> list[tuple[str, dict, dict]]:
    """(job name, job, container) for every container of every Job."""
    return [(name, job, c) for name, job in jobs().items() for c in job["spec"]["template"]["spec"]["containers"]]


def command_of(container: dict, index: int = INDEX) -> list[str]:
    """The argv the container runs: command + args, `sh -c "..."` split as the shell would (a leading exec dropped),
    the completion index substituted for $JOB_COMPLETION_INDEX, ${...} and Kubernetes' $(...)."""
    argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
    if argv[0] in SHELLS and argv[1] == "-c":
        script = INDEX_VAR.sub(str(index), argv[2])
        lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        assert not {";", "&&", "||", "|", "&", ">", "<"} & set(words), f"not one plain command: {script!r}"
        argv = words[1:] if words[0] == "exec" else words
    else:
        argv = [INDEX_VAR.sub(str(index), a) for a in argv]
    assert not any("$" in a for a in argv), f"unexpanded variable in {argv}"
    return argv


def cli_check(args: list[str]):
    """What `python -m lora_search <args>` checks before Hydra starts (lora_search/__main__.py main()): the
    overrides against the groups and the schema, then the composed run's pre-run checks. Returns the RunConfig."""
    from lora_search.commands import preflight
    from lora_search.config import compose
    from lora_search.core import masking

    args = masking.guard(list(args))
    compose.check_overrides(preflight.overrides_of(args))
    assert preflight.is_run(args)
    cfg = preflight.compose(args)
    preflight.check(cfg)
    return cfg


def test_every_manifest_parses_and_names_its_kind():
    found = manifests()
    assert {name for name, _ in found} == {p.name for p in K8S.glob("*.yaml")}
    assert {doc["kind"] for _, doc in found} == {"Secret", "PersistentVolumeClaim", "Job"}
    for name, doc in found:
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), name
    assert len(jobs()) == 2


def test_search_job_is_indexed_with_one_pod_per_index_and_retries_a_killed_worker():
    spec = search_job()["spec"]
    assert spec["completionMode"] == "Indexed"
    assert isinstance(spec["completions"], int) and spec["completions"] >= 2
    assert spec["parallelism"] == spec["completions"]
    # a killed pod's index is started again; backoffLimitPerIndex is only accepted with restartPolicy: Never
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimitPerIndex"] >= 1


def test_promote_job_is_one_pod():
    promote = [job for job in jobs().values() if job["spec"].get("completionMode") != "Indexed"]
    assert len(promote) == 1
    spec = promote[0]["spec"]
    assert spec.get("completions", 1) == 1 and spec.get("parallelism", 1) == 1


def test_every_container_takes_the_storage_url_from_the_secret():
    (secret,) = of_kind("Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert len(keys) == 1
    (key,) = keys
    assert secret["stringData"][key].startswith("postgresql+psycopg://")
    for job, _, c in containers():
        env = {e["name"]: e for e in c.get("env", [])}
        assert "LORA_SEARCH_STORAGE" in env, job
        ref = env["LORA_SEARCH_STORAGE"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], key), job


def test_every_container_has_one_gpu_requests_and_the_results_volume():
    from omegaconf import OmegaConf

    (pvc,) = of_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # several pods write trial records at once
    results_dir = OmegaConf.load(REPO / "lora_search" / "conf" / "config.yaml").results_dir
    for job, doc, c in containers():
        resources = c["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) == 1, job
        assert resources["requests"]["cpu"] and resources["requests"]["memory"], job
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        claimed = {m["mountPath"] for m in c["volumeMounts"]
                   if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
        # results_dir is relative to the working directory: the volume is mounted exactly there
        assert claimed == {posixpath.join(c["workingDir"], results_dir)}, job
        assert c["image"], job


def test_the_search_command_substitutes_the_completion_index():
    (c,) = search_job()["spec"]["template"]["spec"]["containers"]
    assert f"worker={INDEX}" in command_of(c, INDEX)
    assert "worker=0" in command_of(c, 0)


@pytest.fixture
def storage_env(tmp_path, monkeypatch):
    """$LORA_SEARCH_STORAGE as the Secret would set it, but SQLite in tmp_path (no PostgreSQL here)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    monkeypatch.setenv("LORA_SEARCH_STORAGE", url)
    return url


@pytest.mark.slow  # composes the real SmolLM2 sweep for each container
def test_every_container_command_passes_the_cli_checks(storage_env, tmp_path, tiny_cache):
    """The real sweep=rank_lr (the embedded SmolLM2's GGUF metadata is read): composed and checked, nothing run."""
    from lora_search.scale import storage

    expected = {"search": ("search", INDEX), "all": ("all", 0)}
    seen = set()
    for job, _, c in containers():
        argv = command_of(c)
        assert argv[:3] == ["python", "-m", "lora_search"], job
        args = argv[3:]
        assert not any(a.startswith(("sweep.storage", "results_dir")) for a in args), job  # from the env / the PVC
        # test-only: nothing is written under the repository
        cfg = cli_check([*args, f"results_dir={tmp_path / 'results'}", f"cache_dir={tiny_cache}"])
        assert cfg.sweep.name == "rank_lr", job
        assert (cfg.stage, cfg.worker) == expected[cfg.stage], job
        assert storage.storage_url(cfg) == storage_env, job  # the URL comes from the environment variable
        seen.add(cfg.stage)
    assert seen == {"search", "all"}
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("old, new, says", [
    ("stage=search", "stage=serch", "stage must be one of"),
    (f"worker={INDEX}", "worker=x", "worker must be an integer"),
    ("sweep=rank_lr", "sweep=rank_lrr", "is not a known sweep config"),
    ("worker=", "wroker=", "unknown config key 'wroker'"),
])
def test_the_same_check_rejects_a_mutated_search_command(old, new, says, storage_env, tmp_path, tiny_cache):
    (c,) = search_job()["spec"]["template"]["spec"]["containers"]
    args = command_of(c)[3:]
    mutated = [a.replace(old, new, 1) if a.startswith(old) else a for a in args]
    assert mutated != args
    with pytest.raises(LoraSearchError) as info:
        cli_check([*mutated, f"results_dir={tmp_path / 'results'}", f"cache_dir={tiny_cache}"])
    assert any(says in problem for problem in info.value.problems), info.value.problems
