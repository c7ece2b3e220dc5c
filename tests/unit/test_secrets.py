"""Secrets are never written or printed: URL passwords masked through one function, secret values masked in any
text, a storage password moved off the command line, and storage failures as one masked line."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from lora_search.core import masking, records
from lora_search.core.errors import ConfigError
from lora_search.scale import storage
from lora_search.search import study as study_lib

REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("LORA_SEARCH_TEST_PG")


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released): a connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_storage_env(monkeypatch):
    """scrub_argv sets $LORA_SEARCH_STORAGE in this process: each test starts and ends without it."""
    monkeypatch.delenv(masking.STORAGE_ENV, raising=False)
    masking._known.clear()
    yield
    masking._known.clear()


def test_a_url_password_is_masked_through_sqlalchemys_rendering():
    url = "postgresql+psycopg://lora:hunter2x@db.example:5432/studies"
    assert masking.mask_url(url) == make_url(url).render_as_string(hide_password=True)
    assert masking.mask_url(url) == "postgresql+psycopg://lora:***@db.example:5432/studies"
    assert masking.mask_url("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"
    assert masking.mask_url("sqlite:////tmp/s.db?password=hunter2x") == "sqlite:////tmp/s.db?password=***"
    assert records.redact is masking.mask


def test_text_is_masked_for_urls_password_pairs_and_secret_env_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_tokenvalue123")
    monkeypatch.setenv("MY_SERVICE_API_KEY", "apikeyvalue456")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "falsehood")  # not a secret, though its name holds TOKEN
    text = ('connection to "postgresql+psycopg://u:pw1@127.0.0.1:9/db": failed (host=db password=pw1 '
            'dbname=x), token hf_tokenvalue123, key apikeyvalue456, falsehood; see sqlite:////tmp/a.db.')
    masked = masking.mask(text)
    assert masked == ('connection to "postgresql+psycopg://u:***@127.0.0.1:9/db": failed (host=db password=*** '
                      'dbname=x), token ***, key ***, falsehood; see sqlite:////tmp/a.db.')
    assert masking.mask("lora.r=8 trainer.max_new_tokens: 32") == "lora.r=8 trainer.max_new_tokens: 32"


def test_a_storage_password_met_once_is_masked_alone_afterwards(make_cfg):
    cfg = make_cfg("sweep.storage='postgresql+psycopg://u:Sup3rSecret@127.0.0.1/db'")
    storage.storage_url(cfg)
    assert masking.mask("FATAL: bad password Sup3rSecret") == "FATAL: bad password ***"


def test_the_command_line_storage_password_moves_to_the_environment(make_cfg):
    url = "postgresql+psycopg://lora:hunter2x@db.example:5432/studies?sslmode=require"
    argv = masking.scrub_argv(["model=tiny_llama", f"sweep.storage={url}", "lora.r=8"])
    assert argv == ["model=tiny_llama", "sweep.storage='postgresql+psycopg://lora:***@db.example:5432/studies"
                    "?sslmode=require'", "lora.r=8"]
    assert os.environ[masking.STORAGE_ENV] == url
    cfg = make_cfg(argv[1])  # Hydra parses the masked override; the study opens the real URL
    assert cfg.sweep.storage == masking.mask_url(url) and study_lib.storage_url(cfg) == url


def test_a_url_password_elsewhere_on_the_command_line_is_refused():
    with pytest.raises(ConfigError) as info:
        masking.scrub_argv(["data.path=https://user:hunter2x@example.org/train.jsonl"])
    assert info.value.problems == ["data.path: a password inside a URL is accepted only in sweep.storage (or "
                                   "$LORA_SEARCH_STORAGE); got 'https://user:***@example.org/train.jsonl'"]


def test_the_storage_url_can_come_from_the_environment_alone(make_cfg, monkeypatch):
    monkeypatch.setenv(masking.STORAGE_ENV, "postgresql+psycopg://u:hunter2x@db/x")
    assert study_lib.storage_url(make_cfg()) == "postgresql+psycopg://u:hunter2x@db/x"
    monkeypatch.delenv(masking.STORAGE_ENV)
    assert study_lib.storage_url(make_cfg()).endswith("/rank_lr/study.db")
    with pytest.raises(ConfigError, match=r"has its password masked, and \$LORA_SEARCH_STORAGE does not hold"):
        study_lib.storage_url(make_cfg("sweep.storage='postgresql+psycopg://u:***@db/x'"))


def test_a_password_from_a_file_is_refused_before_hydra_writes_it(make_cfg):
    cfg = make_cfg("sweep.storage='postgresql+psycopg://u:hunter2x@127.0.0.1/db'")  # as if read from a sweep file
    with pytest.raises(ConfigError, match=r"would be written to Hydra's .hydra/config.yaml") as info:
        study_lib.check_storage(cfg)
    assert "hunter2x" not in str(info.value)


@pytest.mark.parametrize("url, expected", [
    ("postgresql+psycopg://u:{pw}@127.0.0.1:{port}/db",
     "sweep.storage 'postgresql+psycopg://u:***@127.0.0.1:{port}/db': cannot connect (connection failed:"),
    ("postgress://u:{pw}@127.0.0.1/db", "sweep.storage: unknown database dialect 'postgress'; accepted: sqlite:///"),
    ("postgresql+psycopgx://u:{pw}@127.0.0.1/db", "sweep.storage: unknown driver 'psycopgx' for postgresql"),
    ("mysql+nosuchdriverx://u:{pw}@127.0.0.1/db", "sweep.storage: unknown driver 'nosuchdriverx' for mysql"),
    ("just-a-name", "sweep.storage 'just-a-name': not a database URL; accepted: sqlite:///"),
    ("sqlite:////nonexistent/dir/study.db", "sweep.storage 'sqlite:////nonexistent/dir/study.db': no such folder"),
], ids=["unreachable", "misspelt-dialect", "unknown-driver", "unknown-mysql-driver", "not-a-url", "sqlite-no-folder"])
def test_a_storage_that_cannot_be_opened_is_one_masked_line(url, expected, make_cfg, monkeypatch):
    port, pw = _free_port(), f"pw{uuid.uuid4().hex[:10]}"
    url, expected = url.format(pw=pw, port=port), expected.format(port=port)
    monkeypatch.setenv(masking.STORAGE_ENV, url)  # as main() leaves it after scrub_argv
    cfg = make_cfg()
    with pytest.raises(ConfigError) as info:
        study_lib.check_storage(cfg)
    [line] = info.value.problems
    assert line.startswith(expected) and pw not in line and "\n" not in line, line
    if url.startswith("sqlite"):
        return
    with pytest.raises(ConfigError) as opened:  # the search stage's own open says the same
        study_lib.open_study(cfg)
    assert opened.value.problems[0].split(" (")[0] == line.split(" (")[0] and pw not in opened.value.problems[0]


def test_checking_the_default_storage_creates_nothing(make_cfg, tmp_path):
    study_lib.check_storage(make_cfg())
    assert not (tmp_path / "results").exists()


def test_log_records_are_masked_message_and_traceback(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_tokenvalue123")
    factory = masking._masking_factory(logging.LogRecord)
    try:
        raise RuntimeError("cannot reach postgresql://u:pw9@h/db with hf_tokenvalue123")
    except RuntimeError:
        record = factory("x", logging.ERROR, __file__, 1, "failed with %s", ("hf_tokenvalue123",), sys.exc_info())
    text = logging.Formatter().format(record)
    assert "failed with ***" in text and "postgresql://u:***@h/db with ***" in text
    assert "hf_tokenvalue123" not in text and "pw9" not in text


def test_streams_are_masked():
    import io

    out = io.StringIO()
    stream = masking._MaskedStream(out)
    stream.write("url postgresql://u:pw9@h/db\n")
    assert out.getvalue() == "url postgresql://u:***@h/db\n" and stream.getvalue() == out.getvalue()


def _cli(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "lora_search", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _files_holding(folder: Path, needles: list[str]) -> list[str]:
    hits = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [f"{path.relative_to(folder)}: {n[:6]}..." for n in needles if n.encode() in data]
    return hits


@pytest.mark.slow  # two real command-line runs (a sweep, then a refused one)
def test_a_run_writes_and_prints_no_secret(tmp_path, tiny_cache):
    """Acceptance (issue 13, point 9): a real sweep and a failing one, every file and both streams searched."""
    hf_token, wandb_key = f"hf_{uuid.uuid4().hex}", uuid.uuid4().hex + uuid.uuid4().hex[:8]
    if PG_URL:  # a live server (CI): the real path, password and all
        url = PG_URL
        needles = [url, f":{make_url(url).password}@"] + [make_url(url).password] * (len(make_url(url).password) >= 6)
    else:  # SQLite ignores (and never echoes) a query password: the URL runs and still carries a secret
        pw = f"Pw{uuid.uuid4().hex[:12]}"
        url = f"sqlite:///{tmp_path / 'study.db'}?password={pw}"
        needles = [pw]
    needles += [hf_token, wandb_key]
    env = {**os.environ, "HF_TOKEN": hf_token, "WANDB_API_KEY": wandb_key, "HF_HUB_OFFLINE": "1"}
    env.pop(masking.STORAGE_ENV, None)
    results = tmp_path / "results"
    args = ["model=tiny_llama", f"cache_dir={tiny_cache}", f"results_dir={results}", "stage=search",
            f"sweep.name=secrets_{uuid.uuid4().hex[:8]}", "sweep.n_trials=2", "tracking=wandb", "tracking.mode=offline",
            "data.train_per_task=24", "data.eval_per_task=6", "++sweep.trial={trainer.max_steps: 4, "
            "trainer.eval_every: 2, trainer.batch_size: 4, trainer.exact_match_items: 0}", f"sweep.storage='{url}'"]
    ran = _cli(args, env)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    study = next(results.glob("secrets_*"))
    assert list(study.glob("wandb/offline-run-*/run-*.wandb")), "W&B wrote no offline run despite tracking.mode=offline"
    assert len(list(study.glob("trials/*/status.json"))) >= 2
    [overrides] = list(results.glob("logs/*/*/.hydra/overrides.yaml"))
    assert "sweep.storage=" in overrides.read_text() and "***" in overrides.read_text()

    port, fail_pw = _free_port(), f"Fail{uuid.uuid4().hex[:12]}"
    needles.append(fail_pw)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in results.rglob("*"))
    failed = _cli([*args[:-1], f"sweep.storage=postgresql+psycopg://u:{fail_pw}@127.0.0.1:{port}/db"], env)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in results.rglob("*")) == before  # refused before Hydra ran
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"u:***@127.0.0.1:{port}/db': cannot connect" in errors[0], failed.stderr
    assert "Traceback" not in failed.stderr

    written = _files_holding(tmp_path, needles)  # results/ (logs, .hydra, wandb, trials, study.db) and study.db
    printed = [n[:6] for n in needles for out in (ran.stdout, ran.stderr, failed.stdout, failed.stderr) if n in out]
    assert not written and not printed, (written, printed)
