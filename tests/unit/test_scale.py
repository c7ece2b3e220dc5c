"""Scale-out without a tiny model: slots that end a shared study at exactly n_trials, the promotion claim, Optuna's
storages by scale (journal with heartbeats, the gRPC proxy), and SQLite refused across machines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lora_search.core.errors import ConfigError
from lora_search.scale import heartbeats, promotion_claim, slots, storage

REPO = Path(__file__).resolve().parents[2]


def _study(tmp_path, name="s", url=None):
    url = url or f"journal://{tmp_path / 'study.journal'}"
    return optuna.create_study(study_name=name, storage=storage.open_url(url), load_if_exists=True)


def _running(study, worker="elsewhere:1", admitted=True):
    """A trial another worker runs (admitted: it passed its slot check)."""
    trial = study.ask()
    study._storage.set_trial_user_attr(trial._trial_id, "worker", worker)
    study._storage.set_trial_system_attr(trial._trial_id, slots.ADMITTED, admitted)
    return trial


def _admit_in_thread(study, trial, n):
    outcome = {}

    def run():
        try:
            slots.admit(study, trial, n, poll_s=0.05)
            outcome["result"] = "admitted"
        except slots.NotNeeded as e:
            outcome["result"] = str(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_trial_waits_for_a_slot_and_is_not_needed_when_the_others_fill_the_study(tmp_path):
    study = _study(tmp_path)
    others = [_running(study) for _ in range(3)]  # three workers' trials hold the three slots of n_trials=3
    late = study.ask()  # a fourth worker asked at the same moment
    thread, outcome = _admit_in_thread(study, late, 3)
    time.sleep(0.5)
    assert thread.is_alive() and not outcome  # it waits: training it could make 4 finished trials
    for t in others:
        study.tell(t, 1.0)
    thread.join(timeout=10)
    assert outcome["result"].startswith(slots.NOT_NEEDED)
    assert len(slots.finished(study)) == 3


def test_a_waiting_trial_takes_the_slot_of_one_that_failed(tmp_path):
    study = _study(tmp_path)
    others = [_running(study) for _ in range(3)]
    late = study.ask()
    thread, outcome = _admit_in_thread(study, late, 3)
    study.tell(others[0], 1.0)
    study.tell(others[1], state=TrialState.FAIL)  # a failed trial does not count: its slot is free again
    thread.join(timeout=10)
    assert outcome == {"result": "admitted"}
    assert study._storage.get_trial(late._trial_id).system_attrs[slots.ADMITTED] is True


def test_an_admitted_trial_keeps_its_slot_from_a_lower_numbered_one(tmp_path):
    """A retried (lower-numbered) trial popped from the queue does not take the slot of one already training."""
    study = _study(tmp_path)
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    low, high = study.ask(), study.ask()
    study._storage.set_trial_system_attr(high._trial_id, slots.ADMITTED, True)  # high trains already
    thread, outcome = _admit_in_thread(study, low, 3)
    time.sleep(0.3)
    assert thread.is_alive()
    study.tell(high, 1.0)
    thread.join(timeout=10)
    assert outcome["result"].startswith(slots.NOT_NEEDED) and len(slots.finished(study)) == 3


def test_two_trials_that_pass_the_check_at_once_settle_by_number(tmp_path, monkeypatch):
    """The race: both found the last slot free before either was marked admitted; on the re-check after marking,
    the higher number gives the slot up and waits."""
    study = _study(tmp_path)
    for _ in range(2):
        study.tell(study.ask(), 1.0)
    low, high = study.ask(), study.ask()
    real, first = slots.wait_for_slot, {low.number, high.number}

    def both_pass_once(study_, n, out=None, number=None, **kw):
        if number in first:  # the first check of each saw a free slot (the other not yet admitted)
            first.discard(number)
            return True
        return real(study_, n, out, number, **kw)

    monkeypatch.setattr(slots, "wait_for_slot", both_pass_once)
    study._storage.set_trial_system_attr(high._trial_id, slots.ADMITTED, True)  # high marked itself first
    slots.admit(study, low, 3, poll_s=0.05)  # low re-checks: high is higher-numbered, so low keeps the slot
    thread, outcome = _admit_in_thread(study, high, 3)  # high re-checks: low is ahead; it gives up the slot and waits
    time.sleep(0.3)
    assert thread.is_alive()
    assert study._storage.get_trial(high._trial_id).system_attrs[slots.ADMITTED] is False
    study.tell(low, 1.0)
    thread.join(timeout=10)
    assert outcome["result"].startswith(slots.NOT_NEEDED) and len(slots.finished(study)) == 3


def test_a_worker_waits_before_asking_while_running_trials_fill_the_study(tmp_path):
    study = _study(tmp_path)
    study.tell(study.ask(), 1.0)
    busy = _running(study)
    assert not slots.wait_for_slot(study, 2, deadline=time.monotonic() + 0.3, poll_s=0.05)  # full while it runs
    study.tell(busy, state=TrialState.FAIL)
    assert slots.wait_for_slot(study, 2, poll_s=0.05)
    study.tell(study.ask(), 2.0)
    assert not slots.wait_for_slot(study, 2, poll_s=0.05)  # finished: stop


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
@pytest.mark.slow  # waits on heartbeats or starts subprocesses
def test_a_dead_workers_trial_fails_by_heartbeat_with_a_reason_and_is_queued_again(tmp_path, kind):
    """Optuna has heartbeats for databases only; the journal gets them as a trial attribute. Either way the stale
    trial is failed with the reason the chaos test looks for, and its configuration is queued once."""
    url = f"journal://{tmp_path / 's.journal'}" if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    st = storage.open_url(url, heartbeat_interval=1, grace_period=1, heartbeat_stale_trial_callback=retry)
    study = optuna.create_study(study_name="s", storage=st)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    st.record_heartbeat(dead._trial_id)
    time.sleep(2.5)  # past the grace period (SQLite's timestamps have whole seconds)
    optuna.storages.fail_stale_trials(study)
    failed = st.get_trial(dead._trial_id)
    assert failed.state == TrialState.FAIL and failed.user_attrs["reason"] == heartbeats.STALE_REASON
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.params for t in waiting] == [failed.params]


def test_the_promotion_is_claimed_once_and_taken_over_from_a_dead_or_failed_claimer(tmp_path, make_cfg):
    cfg = make_cfg()
    study = _study(tmp_path, "rank_lr")
    study.tell(study.ask(), 1.0)
    first = promotion_claim.take(study, cfg, "/results/a")
    second = promotion_claim.take(study, cfg, "/results/b")
    assert first.mine and not second.mine and second.attrs["who"] == f"{socket.gethostname()}:{os.getpid()}"
    assert second.attrs["results_dir"] == "/results/a" and first.name == "rank_lr:promotion@1"

    # the claimer died (a pid that is gone on this machine): the next process takes it over under the next name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    promotion_claim._set(study._storage, first.name, pid=int(dead.stdout))
    third = promotion_claim.take(study, cfg, "/results/c")
    assert third.mine and third.name == "rank_lr:promotion@1#2"

    # a claim that failed is taken over too; one that is done is not
    with pytest.raises(RuntimeError):
        with promotion_claim.holding(study, third, 60):
            raise RuntimeError("merge failed")
    fourth = promotion_claim.take(study, cfg, "/results/d")
    assert fourth.mine and fourth.name == "rank_lr:promotion@1#3"
    with promotion_claim.holding(study, fourth, 60):
        pass
    assert not promotion_claim.take(study, cfg, "/results/e").mine

    study.tell(study.ask(), 0.5)  # more trials (n_trials raised): a new promotion to claim
    assert promotion_claim.take(study, cfg, "/results/f").mine


def test_a_claim_whose_creator_died_before_writing_its_state_is_waited_for_a_bounded_time_then_taken_over(
        tmp_path, make_cfg):
    cfg = make_cfg()
    study = _study(tmp_path, "rank_lr")
    study.tell(study.ask(), 1.0)
    # the creator died between creating the claim study and writing its attributes: the claim has no state
    study._storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "rank_lr:promotion@1")
    t0 = time.monotonic()
    after = promotion_claim.take(study, cfg, "/results/b", unwritten_s=0.5)
    assert after.mine and after.name == "rank_lr:promotion@1#2"
    assert 0.5 <= time.monotonic() - t0 < 5
    abandoned = promotion_claim._read(study._storage, "rank_lr:promotion@1")
    assert abandoned["state"] == promotion_claim.FAILED and abandoned["reason"].startswith("abandoned")
    # and the default bound is 3 x sweep.heartbeat_s, not forever
    study.tell(study.ask(), 0.5)
    study._storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "rank_lr:promotion@2")
    t0 = time.monotonic()
    assert promotion_claim.take(study, make_cfg("sweep.heartbeat_s=1"), "/results/c").name == "rank_lr:promotion@2#2"
    assert 3 <= time.monotonic() - t0 < 10


def test_a_creator_that_writes_its_state_after_the_claim_was_found_abandoned_does_not_promote(
        tmp_path, make_cfg, monkeypatch):
    cfg = make_cfg()
    study = _study(tmp_path, "rank_lr")
    study.tell(study.ask(), 1.0)
    real_set = promotion_claim._set

    def stalled_creator(storage, name, **attrs):
        monkeypatch.setattr(promotion_claim, "_set", real_set)
        # while this creator stalls, another process waits out the bound and takes the claim over
        other = promotion_claim.take(study, cfg, "/results/b", unwritten_s=0.1)
        assert other.mine and other.name == "rank_lr:promotion@1#2"
        real_set(storage, name, **attrs)

    monkeypatch.setattr(promotion_claim, "_set", stalled_creator)
    late = promotion_claim.take(study, cfg, "/results/a")
    assert not late.mine and late.name == "rank_lr:promotion@1#2" and late.attrs["results_dir"] == "/results/b"
    assert promotion_claim._read(study._storage, "rank_lr:promotion@1")["state"] == promotion_claim.FAILED


@pytest.mark.slow  # 6 spawned interpreters per storage
def test_claims_race_across_processes_through_every_storage(tmp_path):
    """Six processes claim one study at once: exactly one wins (SQLite, a journal, and PostgreSQL when CI starts one)."""
    import multiprocessing
    import uuid

    ctx = multiprocessing.get_context("spawn")
    pg = os.environ.get("LORA_SEARCH_TEST_PG")
    for url in (f"sqlite:///{tmp_path / 'c.db'}", f"journal://{tmp_path / 'c.journal'}", *([pg] if pg else [])):
        name = f"race_{uuid.uuid4().hex[:8]}"
        optuna.create_study(study_name=name, storage=storage.open_url(url))
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_claim_in_a_worker, args=(url, name, barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert sorted(outcomes) == ["lost"] * 5 + ["won"], url


def _claim_in_a_worker(url, name, barrier, results) -> None:
    from lora_search.config.compose import load_config
    from lora_search.scale import promotion_claim, storage

    cfg = load_config(["model=tiny_llama", "tracking=none"])
    study = optuna.load_study(study_name=name, storage=storage.open_url(url))
    barrier.wait(timeout=60)
    try:
        results.put("won" if promotion_claim.take(study, cfg, "/r").mine else "lost")
    except Exception as e:  # noqa: BLE001 - the outcome is what the test compares
        results.put(f"{type(e).__name__}: {e}"[:200])


def test_sqlite_in_use_on_another_machine_is_refused_naming_the_alternatives(tmp_path, make_cfg):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=storage.open_url(url))
    storage.check_sharing(study, url)  # nobody else: fine
    trial = study.ask()
    study._storage.set_trial_user_attr(trial._trial_id, "worker", f"{socket.gethostname()}:4242")
    storage.check_sharing(study, url)  # a worker on this machine: fine
    _running(study, worker="gpu-node-7:1234")
    with pytest.raises(ConfigError) as info:
        storage.check_sharing(study, url)
    line = str(info.value)
    assert "gpu-node-7" in line and "journal://" in line and "postgresql" in line and "grpc://" in line
    storage.check_sharing(study, f"journal://{tmp_path / 'x.journal'}")  # other storages are made for it


def test_journal_and_grpc_urls_are_checked_before_anything_runs(tmp_path, make_cfg, monkeypatch):
    with pytest.raises(ConfigError, match="no such folder"):
        storage.check_storage(make_cfg(f"sweep.storage=journal://{tmp_path}/missing/s.journal"))
    with pytest.raises(ConfigError, match="a journal URL names a file"):
        storage.check_storage(make_cfg("sweep.storage=journal://"))
    with pytest.raises(ConfigError, match=r"grpc://host:port"):
        storage.check_storage(make_cfg("sweep.storage=grpc://proxyhost"))
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT_S", 1)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=f"no gRPC storage proxy answers at 127.0.0.1:{port}.*storage-proxy"):
        storage.check_storage(make_cfg(f"sweep.storage=grpc://127.0.0.1:{port}"))
    storage.check_storage(make_cfg(f"sweep.storage=journal://{tmp_path}/s.journal"))
    assert not (tmp_path / "s.journal").exists()  # checking creates nothing


@pytest.mark.parametrize("args, expected", [
    (["--storage", "journal:///tmp/x.journal"], "the proxy serves a database"),
    ([], "needs the database URL"),
    (["--storage", "sqlite:////tmp/x.db", "--port", "70000"], "--port must be from 1 to 65535"),
    (["--storage", "sqlite:////tmp/x.db", "--prot", "1"], "storage-proxy: see the usage"),
])
@pytest.mark.slow  # waits on heartbeats or starts subprocesses
def test_storage_proxy_bad_input_is_one_line(args, expected, monkeypatch):
    monkeypatch.delenv("LORA_SEARCH_STORAGE", raising=False)
    proc = subprocess.run([sys.executable, "-m", "lora_search", "storage-proxy", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # waits on heartbeats or starts subprocesses
def test_the_grpc_proxy_serves_a_study_to_clients(tmp_path):
    """`python -m lora_search storage-proxy` in front of SQLite; a client through grpc:// sees what another wrote,
    and the proxy's clients get heartbeats."""
    pytest.importorskip("grpc")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = f"sqlite:///{tmp_path / 'behind.db'}"
    proxy = subprocess.Popen([sys.executable, "-m", "lora_search", "storage-proxy", "--storage", db, "--port",
                              str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"grpc://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                a = storage.open_url(url, heartbeat_interval=1, grace_period=2)
                break
            except ConfigError:
                assert time.monotonic() < deadline and proxy.poll() is None, proxy.stdout.read() if proxy.poll() else ""
        study = optuna.create_study(study_name="p", storage=a)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        b = optuna.load_study(study_name="p", storage=storage.open_url(url))
        assert len(b.trials) == 3 and b.best_value == study.best_value
        assert heartbeats.HEARTBEAT_ATTR in b.trials[0].system_attrs  # beats recorded through the proxy
        assert len(optuna.load_study(study_name="p", storage=db).trials) == 3  # in the database behind it
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)


@pytest.mark.slow  # waits on heartbeats or starts subprocesses
def test_a_claim_held_on_another_machine_is_waited_for_then_taken_over_when_its_heartbeat_stops(tmp_path, make_cfg):
    cfg = make_cfg("sweep.heartbeat_s=1")
    study = _study(tmp_path, "rank_lr")
    study.tell(study.ask(), 1.0)
    held = promotion_claim.take(study, cfg, "/results/a")
    promotion_claim._set(study._storage, held.name, host="gpu-node-3", who="gpu-node-3:77", heartbeat=time.time())
    t0 = time.monotonic()
    after = promotion_claim.take(study, cfg, "/results/b", poll_s=0.2)  # a replacement pod: waits, then takes it over
    assert after.mine and after.name == "rank_lr:promotion@1#2" and time.monotonic() - t0 >= 2.5  # 3 x heartbeat_s


def test_queued_retries_end_not_needed_once_the_study_is_full_and_enqueued_configurations_stay(tmp_path):
    study = _study(tmp_path)
    study.tell(study.ask(), 1.0)
    study.enqueue_trial({"x": 0.5}, user_attrs={"retry_of": 0})  # a dead worker's trial, queued again
    study.enqueue_trial({"x": 0.25})  # the sweep file's own configuration
    assert slots.drop_retries(study) == [1]
    retry = study.trials[1]
    assert retry.state == TrialState.FAIL and retry.user_attrs["reason"].startswith(slots.NOT_NEEDED)
    assert study.trials[2].state == TrialState.WAITING
