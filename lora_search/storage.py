"""The study's storage: its URL (sweep.storage, else $LORA_SEARCH_STORAGE, else SQLite under results/), Optuna's
RDBStorage on it, and every way opening it fails as one line with the password masked and what is accepted.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import sqlalchemy
from sqlalchemy.engine import make_url

from lora_search import secrets
from lora_search.errors import ConfigError, LoraSearchError
from lora_search.schema import RunConfig

ACCEPTED = "sqlite:///path/to/study.db, postgresql+psycopg://user@host/db or mysql+pymysql://user@host/db"
DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pymysql": "pymysql", "MySQLdb": "mysqlclient"}
CONNECT_TIMEOUT_S = 10


def default_url(cfg: RunConfig) -> str:
    """SQLite at results/<study>/study.db."""
    return f"sqlite:///{(Path(cfg.results_dir) / cfg.sweep.name / 'study.db').resolve()}"


def storage_url(cfg: RunConfig) -> str:
    """The storage URL: sweep.storage (a masked one read back from $LORA_SEARCH_STORAGE), else that variable,
    else SQLite at results/<study>/study.db."""
    given, env = cfg.sweep.storage, os.environ.get(secrets.STORAGE_ENV)
    if not given:
        url = env or default_url(cfg)
    elif env and secrets.mask_url(env) == given:
        url = env
    elif getattr(make_url_or_none(given), "password", None) == secrets.MASK:
        raise ConfigError(f"{secrets.STORAGE_KEY} {given!r} has its password masked, and ${secrets.STORAGE_ENV} "
                          f"does not hold that URL; give the URL with its password, or set {secrets.STORAGE_ENV}")
    else:
        url = given
    secrets.remember(url)
    return url


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
    shown = secrets.mask_url(url)
    text = str(getattr(error, "orig", None) or error).strip()
    first = secrets.mask(text.splitlines()[0] if text else type(error).__name__)
    parsed = make_url_or_none(url)
    if parsed is not None and isinstance(error, sqlalchemy.exc.NoSuchModuleError):
        backend, _, driver = parsed.drivername.partition("+")
        if _dialect_known(backend):
            why = f"unknown driver {driver!r} for {backend}; accepted: {ACCEPTED}"
        else:
            why = f"unknown database dialect {backend!r}; accepted: {ACCEPTED}"
        return ConfigError(f"{secrets.STORAGE_KEY}: {why} (got {shown!r})")
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
    return ConfigError(f"{secrets.STORAGE_KEY} {shown!r}: {why}")


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
    from filelock import FileLock

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
    """Optuna's RDBStorage on the study's storage (kwargs: heartbeats); ConfigError when it cannot be opened."""
    import optuna

    url = storage_url(cfg)
    try:
        with _creating(url):
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url), **kwargs)
    except LoraSearchError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, a server that does not answer
        raise explain(url, e) from None


def check_storage(cfg: RunConfig) -> None:
    """Open the storage's connection without creating a study or tables (nor an SQLite file); ConfigError if it fails."""
    given = cfg.sweep.storage
    if given and secrets.has_password(given):
        raise ConfigError(f"{secrets.STORAGE_KEY}: the password in {secrets.mask_url(given)!r} would be written to "
                          f"Hydra's .hydra/config.yaml; give the URL on the command line (masked there), in "
                          f"${secrets.STORAGE_ENV}, or without the password (PGPASSWORD, ~/.pgpass)")
    url = storage_url(cfg)
    try:
        parsed = make_url(url)
        engine = sqlalchemy.create_engine(url, **engine_kwargs(url))
    except Exception as e:  # noqa: BLE001
        raise explain(url, e) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            folder = Path(parsed.database).parent if parsed.database not in (None, "", ":memory:") else None
            if url != default_url(cfg) and folder is not None and not folder.is_dir():
                raise ConfigError(f"{secrets.STORAGE_KEY} {secrets.mask_url(url)!r}: no such folder {str(folder)!r} "
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
