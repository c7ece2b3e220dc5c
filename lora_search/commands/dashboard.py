"""The `dashboard` command: optuna-dashboard on the study's storage, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path

import optuna
import optuna_dashboard

from lora_search.config.schema import RunConfig
from lora_search.core.errors import ConfigError
from lora_search.scale import storage

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port) -> None:
    """Raise ConfigError unless port is an integer 1..65535 that host can bind now."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"dashboard.port must be an integer from 1 to 65535, got {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"dashboard.host={host} cannot be resolved: {e.strerror}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no clash
        try:
            sock.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot serve the dashboard on {host}:{port} ({e.strerror}): the port is in use or "
                              f"not allowed; pick another with dashboard.port=...") from None


def open_storage(cfg: RunConfig) -> optuna.storages.RDBStorage:
    """The study's existing storage; never creates an empty study database."""
    default = Path(cfg.results_dir) / cfg.sweep.name / "study.db"
    if storage.storage_url(cfg) == storage.default_url(cfg) and not default.is_file():
        raise ConfigError(f"no study at {default}: run `python -m lora_search sweep={cfg.sweep.name}` first")
    return storage.open_rdb(cfg)  # one ConfigError line, password masked, when it cannot be opened


def page_url(host: str, port: int, study_id: int | None) -> str:
    """The dashboard's address: the study's own page when the study exists."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard/" + (f"studies/{study_id}" if study_id is not None else "")


def serve(cfg: RunConfig) -> None:
    """Serve optuna-dashboard for the study's storage at dashboard.host:dashboard.port until interrupted."""
    host, port = cfg.dashboard.host, cfg.dashboard.port
    rdb = open_storage(cfg)
    check_port(host, port)
    if not is_loopback(host):
        log.warning("dashboard bound to %s:%s: optuna-dashboard has no authentication, so anyone who can reach "
                    "%s:%s can read and change the study; use only on a trusted network", host, port, host, port)
    try:
        study_id = rdb.get_study_id_from_name(cfg.sweep.name)
    except KeyError:
        study_id = None
        log.warning("study %s is not in the storage yet: the dashboard lists the studies it has", cfg.sweep.name)
    print(f"optuna-dashboard for study {cfg.sweep.name}: {page_url(host, port, study_id)} (Ctrl-C to stop)",
          flush=True)
    optuna_dashboard.run_server(rdb, host=host, port=port)
