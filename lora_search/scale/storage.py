"""The study's storage: its URL (sweep.storage, else $LORA_SEARCH_STORAGE, else SQLite under results/), the Optuna
storage on it, and every way opening it fails as one line with the password masked and what is accepted.

Storages by scale (all Optuna's own):
  sqlite:///path/study.db                one worker, or a few on one machine (the default, under results/<study>/)
  journal:///path/study.journal          several workers on one machine or on a shared disk, no database server
                                         (Optuna's JournalStorage on a file, with its O_EXCL lock: safe on NFS)
  postgresql+psycopg://user@host/db      many machines
  grpc://host:port                       hundreds of workers: Optuna's gRPC proxy (`python -m lora_search
                                         storage-proxy`) in front of one database, which caches and batches
Heartbeats for every storage are in heartbeats.py; the gRPC proxy server in storage_proxy.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import optuna
import sqlalchemy
from filelock import FileLock
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from lora_search.config.schema import RunConfig
from lora_search.core import masking
from lora_search.core.errors import ConfigError, LoraSearchError
from lora_search.scale.heartbeats import beating, reasoned

ACCEPTED = ("sqlite:///path/to/study.db, journal:///path/to/study.journal, postgresql+psycopg://user@host/db, "
            "mysql+pymysql://user@host/db or grpc://host:port")
ALTERNATIVES = ("journal:///<shared disk>/study.journal (no server), postgresql+psycopg://user@host/db, or "
                "grpc://host:port in front of one (python -m lora_search storage-proxy)")
DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pymysql": "pymysql", "MySQLdb": "mysqlclient"}
CONNECT_TIMEOUT_S = 10


def default_url(cfg: RunConfig) -> str:
    """SQLite at results/<study>/study.db."""
    return f"sqlite:///{(Path(cfg.results_dir) / cfg.sweep.name / 'study.db').resolve()}"


def storage_url(cfg: RunConfig) -> str:
    """The storage URL: sweep.storage (a masked one read back from $LORA_SEARCH_STORAGE), else that variable,
    else SQLite at results/<study>/study.db."""
    given, env = cfg.sweep.storage, os.environ.get(masking.STORAGE_ENV)
    if not given:
        url = env or default_url(cfg)
    elif env and masking.mask_url(env) == given:
        url = env
    elif getattr(make_url_or_none(given), "password", None) == masking.MASK:
        raise ConfigError(f"{masking.STORAGE_KEY} {given!r} has its password masked, and ${masking.STORAGE_ENV} "
                          f"does not hold that URL; give the URL with its password, or set {masking.STORAGE_ENV}")
    else:
        url = given
    masking.remember(url)
    return url


def kind(url: str) -> str:
    """sqlite, journal, grpc, or rdb (a database server)."""
    if url.startswith("journal:"):
        return "journal"
    if url.startswith("grpc:"):
        return "grpc"
    return "sqlite" if url.startswith("sqlite") else "rdb"


def journal_path(url: str) -> Path:
    """journal:///abs/path (or journal://relative/path) -> the journal file."""
    rest = url[len("journal://"):] if url.startswith("journal://") else ""
    if not rest or rest.endswith("/"):
        raise ConfigError(f"{masking.STORAGE_KEY} {url!r}: a journal URL names a file, e.g. "
                          f"journal:///shared/studies/rank_lr.journal")
    return Path(rest)


def grpc_address(url: str) -> tuple[str, int]:
    """grpc://host:port -> (host, port)."""
    parsed = make_url_or_none(url)
    if parsed is None or not parsed.host or not parsed.port or parsed.database:
        raise ConfigError(f"{masking.STORAGE_KEY} {masking.mask_url(url)!r}: a gRPC proxy URL is grpc://host:port "
                          f"(start the proxy with `python -m lora_search storage-proxy --storage <database URL>`)")
    return parsed.host, parsed.port


def make_url_or_none(url: str):
    """SQLAlchemy's parsed URL, or None when url is not one."""
    try:
        return make_url(url)
    except Exception:  # noqa: BLE001
        return None


def engine_kwargs(url: str) -> dict:
    """SQLite waits for the writer lock (workers serialise on it); a server is pinged and given a connect timeout."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    if url.startswith(("postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://")):  # libpq's own timeout
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    return {"pool_pre_ping": True}


def explain(url: str, error: Exception) -> ConfigError:
    """A storage failure as one line: the masked URL, what went wrong, what is accepted."""
    shown = masking.mask_url(url)
    text = str(getattr(error, "orig", None) or error).strip()
    first = masking.mask(text.splitlines()[0] if text else type(error).__name__)
    parsed = make_url_or_none(url)
    if parsed is not None and isinstance(error, sqlalchemy.exc.NoSuchModuleError):
        backend, _, driver = parsed.drivername.partition("+")
        if _dialect_known(backend):
            why = f"unknown driver {driver!r} for {backend}; accepted: {ACCEPTED}"
        else:
            why = f"unknown database dialect {backend!r}; accepted: {ACCEPTED}"
        return ConfigError(f"{masking.STORAGE_KEY}: {why} (got {shown!r})")
    if isinstance(error, sqlalchemy.exc.ArgumentError) or parsed is None:
        detail = "" if isinstance(error, sqlalchemy.exc.ArgumentError) else f" ({first})"
        why = f"not a database URL{detail}; accepted: {ACCEPTED}"
    elif isinstance(error, ImportError):
        module = getattr(error.__cause__, "name", None) or getattr(error, "name", None) or parsed.drivername
        why = f"the database driver {module!r} is not installed; `pip install {DRIVERS.get(module, module)}`"
    elif isinstance(error, sqlalchemy.exc.OperationalError) and parsed.get_backend_name() == "sqlite":
        why = f"cannot open the database file ({first}): does its folder exist, and may this user write there?"
    elif isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        why = f"cannot connect ({first})"
    else:
        why = f"{type(error).__name__}: {first}"
    return ConfigError(f"{masking.STORAGE_KEY} {shown!r}: {why}")


def _dialect_known(backend: str) -> bool:
    try:
        sqlalchemy.dialects.registry.load(backend)
        return True
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def _creating(url: str):
    """For an SQLite file: a lock beside it while Optuna opens it. Workers that open one new study file at once
    (Hydra's launchers start them together) would otherwise all run Optuna's CREATE TABLE and all but one fail with
    `table ... already exists`. A server database creates its tables in transactions of its own: no lock. Where the
    lock cannot be created (a read-only folder: nothing will be created there either) Optuna opens it unlocked."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        yield
        return

    lock = FileLock(f"{parsed.database}.lock", timeout=300)
    try:
        lock.acquire()
    except OSError:  # not writable; filelock's Timeout is not an OSError and is raised
        yield
        return
    try:
        yield
    finally:
        lock.release()


def open_rdb(cfg: RunConfig, **kwargs):
    """The study's Optuna storage (kwargs: heartbeats); ConfigError when it cannot be opened. A database URL gives
    Optuna's RDBStorage, journal:// a JournalStorage on the file, grpc:// the gRPC proxy's client."""
    return open_url(storage_url(cfg), **kwargs)


def open_url(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
             heartbeat_stale_trial_callback=None):
    """An Optuna storage for url (see the module docstring), with heartbeats when an interval is given."""
    beats = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
             "heartbeat_stale_trial_callback": heartbeat_stale_trial_callback}
    try:
        if kind(url) == "journal":
            return _open_journal(url, beats)
        if kind(url) == "grpc":
            return _open_grpc(url, beats)
        with _creating(url):
            return reasoned(optuna.storages.RDBStorage)(url, engine_kwargs=engine_kwargs(url),
                                                        **{k: v for k, v in beats.items() if v is not None})
    except LoraSearchError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, a server that does not answer
        raise explain(url, e) from None


def _open_journal(url: str, beats: dict):
    path = journal_path(url)
    if not path.parent.is_dir():
        raise ConfigError(f"{masking.STORAGE_KEY} {url!r}: no such folder {str(path.parent)!r} for the journal "
                          f"file; create it first")
    # The open lock (O_CREAT | O_EXCL) works on NFS, where Optuna's default symlink lock may not.
    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return beating(optuna.storages.JournalStorage)(backend, **beats)


def _open_grpc(url: str, beats: dict):
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise ConfigError(f"{masking.STORAGE_KEY} {masking.mask_url(url)!r}: the gRPC client is not installed; "
                          f"`pip install 'lora_search[grpc]'` (grpcio)") from None
    host, port = grpc_address(url)
    proxy = beating(optuna.storages.GrpcStorageProxy)(host=host, port=port, **beats)
    try:
        proxy.wait_server_ready(timeout=CONNECT_TIMEOUT_S)
    except ConnectionError:
        proxy.close()
        raise ConfigError(f"{masking.STORAGE_KEY} {masking.mask_url(url)!r}: no gRPC storage proxy answers at "
                          f"{host}:{port} within {CONNECT_TIMEOUT_S} s; start it with `python -m lora_search "
                          f"storage-proxy --storage <database URL> --host 0.0.0.0 --port {port}`") from None
    return proxy


def check_storage(cfg: RunConfig) -> None:
    """Open the storage's connection without creating a study or tables (nor an SQLite file); ConfigError if it fails."""
    given = cfg.sweep.storage
    if given and masking.has_password(given):
        raise ConfigError(f"{masking.STORAGE_KEY}: the password in {masking.mask_url(given)!r} would be written to "
                          f"Hydra's .hydra/config.yaml; give the URL on the command line (masked there), in "
                          f"${masking.STORAGE_ENV}, or without the password (PGPASSWORD, ~/.pgpass)")
    url = storage_url(cfg)
    if kind(url) == "journal":
        path = journal_path(url)
        if not path.parent.is_dir():
            raise ConfigError(f"{masking.STORAGE_KEY} {url!r}: no such folder {str(path.parent)!r} for the journal "
                              f"file; create it first")
        return
    if kind(url) == "grpc":
        _open_grpc(url, {}).close()
        return
    try:
        parsed = make_url(url)
        engine = sqlalchemy.create_engine(url, **engine_kwargs(url))
    except Exception as e:  # noqa: BLE001
        raise explain(url, e) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            folder = Path(parsed.database).parent if parsed.database not in (None, "", ":memory:") else None
            if url != default_url(cfg) and folder is not None and not folder.is_dir():
                raise ConfigError(f"{masking.STORAGE_KEY} {masking.mask_url(url)!r}: no such folder {str(folder)!r} "
                                  f"for the SQLite file; create it first")
            return
        with engine.connect():
            pass
    except LoraSearchError:
        raise
    except Exception as e:  # noqa: BLE001
        raise explain(url, e) from None
    finally:
        engine.dispose()


def check_sharing(study, url: str) -> None:
    """ConfigError when an SQLite study is in use by a worker on another machine: SQLite's file locks do not hold
    over network filesystems, so two machines writing one file corrupt it. Trials whose worker stopped beating are
    failed first (a study moved from another machine is not refused for them)."""
    if kind(url) != "sqlite":
        return
    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    others = sorted({str(t.user_attrs.get("worker", "")).rsplit(":", 1)[0]
                     for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))} - {host, ""})
    if others:
        raise ConfigError(f"{masking.STORAGE_KEY} {masking.mask_url(url)!r}: study {study.study_name!r} has trials "
                          f"running on {', '.join(others)}, and this is {host}: an SQLite file cannot be shared by "
                          f"several machines (its locks do not hold over network filesystems); use {ALTERNATIVES}")


