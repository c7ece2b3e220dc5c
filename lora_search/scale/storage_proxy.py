"""`python -m lora_search storage-proxy`: Optuna's gRPC storage proxy in front of one database."""

from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import optuna

from lora_search.core import masking
from lora_search.core.errors import ConfigError
from lora_search.scale.storage import kind, open_url


def serve_proxy(argv: list[str]) -> None:
    """`python -m lora_search storage-proxy --storage <database URL> [--host H] [--port P]`: Optuna's gRPC storage
    proxy in front of one database, for hundreds of workers (each with sweep.storage=grpc://H:P). The URL may come
    from $LORA_SEARCH_STORAGE instead (a password on a command line shows in `ps`)."""
    parser = argparse.ArgumentParser(prog="python -m lora_search storage-proxy", description=serve_proxy.__doc__)
    parser.add_argument("--storage", default=os.environ.get(masking.STORAGE_ENV),
                        help=f"the database URL (default: ${masking.STORAGE_ENV})")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=13000)
    parser.add_argument("--threads", type=int, default=32, help="the server's thread pool")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        if e.code:
            raise ConfigError("storage-proxy: see the usage above; e.g. `python -m lora_search storage-proxy "
                              "--storage postgresql+psycopg://user@host/db --port 13000`") from None
        raise
    if not args.storage:
        raise ConfigError(f"storage-proxy needs the database URL: --storage postgresql+psycopg://user@host/db, or "
                          f"${masking.STORAGE_ENV}")
    url = args.storage
    masking.remember(url)
    if kind(url) in ("journal", "grpc"):
        raise ConfigError(f"storage-proxy --storage {masking.mask_url(url)!r}: the proxy serves a database (Optuna's "
                          f"gRPC proxy does not support a journal, and a proxy in front of a proxy adds nothing); "
                          f"accepted: postgresql+psycopg://user@host/db, mysql+pymysql://user@host/db or sqlite:///path")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"storage-proxy --port must be from 1 to 65535, got {args.port}")
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise ConfigError("storage-proxy needs the gRPC server: `pip install 'lora_search[grpc]'` (grpcio)") from None
    backend = optuna.storages.get_storage(open_url(url))  # Optuna's cached storage in front of the database
    log = logging.getLogger("lora_search.scale.storage")
    log.info("gRPC storage proxy for %s on %s:%d: workers join with sweep.storage=grpc://%s:%d", masking.mask_url(url),
             args.host, args.port, "<this host>" if args.host in ("0.0.0.0", "::") else args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the proxy has no authentication: anyone who can reach %s:%d can read and change every study in "
                    "the database; use only on a trusted network", args.host, args.port)
    optuna.storages.run_grpc_proxy_server(backend, host=args.host, port=args.port,
                                          thread_pool=ThreadPoolExecutor(args.threads))
