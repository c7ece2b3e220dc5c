"""Shared fixtures: composed configs, a tiny-model worker, and the gpu marker's skip."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache folder for the tiny model, shared by the session."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def make_cfg(tmp_path, tiny_cache):
    """Compose a config for the tiny model with extra overrides, results under tmp_path."""
    from lora_search.config.compose import load_config

    def make(*overrides, model="tiny_llama", tracking="none"):
        base = [f"model={model}", f"results_dir={tmp_path / 'results'}", f"tracking={tracking}"]
        if model == "tiny_llama":
            base.append(f"cache_dir={tiny_cache}")
        return load_config(base + list(overrides))

    return make


TINY_FAST = [
    "data.train_per_task=24",
    "data.eval_per_task=6",
    "trainer.max_steps=12",
    "trainer.batch_size=4",
    "trainer.eval_every=6",
    "trainer.exact_match_items=8",
    "trainer.max_new_tokens=8",
    "trainer.learning_rate=3e-3",
]


@pytest.fixture
def tiny_overrides():
    """Overrides that make a tiny-model run take a second or two."""
    return list(TINY_FAST)


def _wandb_records(path):
    """The protobuf records of an offline run's .wandb file (W&B's LevelDB-style log: 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks = path.read_bytes(), 7, b""  # 7: the ':W&B' file header, magic and version
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(chunks)
            yield record


def read_wandb_runs(folder, wait_s: float = 60.0):
    """Every offline run under folder/wandb/: name, group, job type, tags, config, history rows, summary, artifacts.

    W&B's service writes a run's file on its own thread, and `run.finish()` can return before the last records (the
    final summary, the exit record) reach the disk: on a loaded machine a read right after finish missed the summary.
    A run file without its exit record is read again until it has one (up to wait_s)."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        runs = _read_wandb_runs_once(folder)
        unfinished = [r for found in runs.values() for r in found if "exit_code" not in r]
        if not unfinished or time.monotonic() > deadline:
            return {name: found[-1] for name, found in runs.items()}
        time.sleep(0.5)


def _read_wandb_runs_once(folder):
    import json
    from pathlib import Path

    runs = {}
    for path in sorted(Path(folder).glob("wandb/offline-run-*/run-*.wandb")):
        run = {"history": [], "summary": {}, "config": {}, "artifacts": [], "tags": []}
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(name=r.run.display_name, group=r.run.run_group, job_type=r.run.job_type,
                           tags=list(r.run.tags))
                run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                run["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                       for i in r.history.item})
            elif kind == "summary":
                run["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                       for i in r.summary.update})
            elif kind == "artifact":
                run["artifacts"].append({"name": r.artifact.name, "type": r.artifact.type})
            elif kind == "exit":
                run["exit_code"] = r.exit.exit_code
        runs.setdefault(run.get("name"), []).append(run)
    return runs


@pytest.fixture
def wandb_runs():
    """Read back the offline W&B runs written under a folder."""
    return read_wandb_runs


@pytest.fixture(autouse=True)
def _tracking_fresh():
    """A W&B failure switches tracking off for the process: give every test a fresh start."""
    from lora_search.train import tracking

    tracking._broken.clear()
    yield
    tracking._broken.clear()


@pytest.fixture(autouse=True)
def _no_storage_from_earlier_tests():
    """`main()` run in-process moves a storage URL into $LORA_SEARCH_STORAGE: no test inherits another's (popped
    before and after each test, not through monkeypatch, whose undo would bring a leaked value back)."""
    os.environ.pop("LORA_SEARCH_STORAGE", None)
    yield
    os.environ.pop("LORA_SEARCH_STORAGE", None)


def _is_capture(stream) -> bool:
    """Whether stream is one of pytest's per-test capture streams (or masking's wrapper around one): closed once the
    test that was running when a handler was bound to it ends."""
    from lora_search.core import masking

    while isinstance(stream, masking._MaskedStream):
        stream = stream._stream
    return type(stream).__module__.startswith("_pytest")


def _repoint_stray_stream_handlers() -> None:
    """Libraries that set up logging lazily bind a StreamHandler to whatever sys.stderr is at that moment: under
    pytest, a test's capture stream (masking.install wraps it, and the command's logging.basicConfig and Hydra's
    handlers bind to that), closed when the test ends: the next test's log lines then print '--- Logging error ---'.
    absl's handler (rouge-score imports absl) even closes its stream when Hydra's logging setup later shuts the old
    handlers down, which ends the whole run ('lost sys.stderr'). Point every handler bound to a capture stream at
    the real stderr, and only those: a handler that owns its stream closes it on shutdown (torch's lazy trace-file
    handler, a StreamHandler whose stream is None until it logs: pointed at sys.__stderr__ it closed the real stderr
    under every later test)."""
    import logging

    for ref in list(logging._handlerList):  # every handler created, attached to a logger or not
        handler = ref()
        if (isinstance(handler, logging.StreamHandler) and not type(handler).__module__.startswith("_pytest")
                and not isinstance(handler, logging._StderrHandler)  # lastResort follows sys.stderr by itself
                and _is_capture(handler.stream)):
            with handler.lock or contextlib.nullcontext():  # not setStream: it flushes the old, maybe closed, stream
                handler.stream = sys.__stderr__


try:  # absl's handler (rouge-score imports absl) exists from its import on: created now, pointed at the real stderr
    import absl.logging

    absl.logging.get_absl_handler().python_handler.setStream(sys.__stderr__)
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _stream_handlers_on_real_stderr():
    yield
    _repoint_stray_stream_handlers()
