"""Secrets are never written or printed.

One function masks a URL's password (SQLAlchemy's URL rendering with the password hidden); `mask` applies it to
every URL inside a text and also hides `password=...` pairs and the known secret values (tokens and keys in the
environment, the storage password) wherever lora_search writes or prints text. `guard` runs before Hydra sees the
command line: a storage URL with a password moves into $LORA_SEARCH_STORAGE (inherited by worker processes) and
the override keeps the masked URL, so Hydra's `.hydra/` files, its log and W&B's run metadata never hold it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from urllib.parse import quote

from sqlalchemy.engine import make_url

from lora_search.core.errors import ConfigError

MASK = "***"
STORAGE_ENV = "LORA_SEARCH_STORAGE"  # the storage URL, password included, kept out of the command line
STORAGE_KEY = "sweep.storage"
MIN_LEN = 6  # shorter values are masked inside URLs and `password=...` only: masking them everywhere mangles text
# Environment variables whose values are secrets: HF_TOKEN, WANDB_API_KEY, PGPASSWORD, AWS_SECRET_ACCESS_KEY ...
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|(^|_)(TOKEN|SECRET|KEY|APIKEY|CREDENTIALS?)(_|$)", re.I)
NOT_SECRET_NAME = re.compile(r"_(FILE|PATH|DIR|HOME)$", re.I)  # HF_TOKEN_PATH names a file, not a token
URL_IN_TEXT = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`.,;:)\]}]", re.I)  # no trailing punctuation
URL_USERINFO = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+(?=@)", re.I)
KEY_VALUE = re.compile(r"(?P<key>\b[\w.-]*(?:password|passwd|secret|api_?key|access_?token|auth_?token|hf_token)"
                       r"[\"']?\s*[=:]\s*[\"']?)(?P<value>[^\s\"',;&)}\]]+)", re.I)
SECRET_QUERY = re.compile(r"password|passwd|secret|token|api_?key", re.I)
SECRET_KEY = re.compile(r"(^|_)(api_?key|token|password|secret|auth)$", re.I)  # a config key whose value is a secret
_known: set[str] = set()  # secret values met in this process (a storage password given in a config)



def is_secret_key(key) -> bool:
    """Whether a config or record key names a secret (`api_key`, `hf_token`, `password`, ...)."""
    return bool(SECRET_KEY.search(str(key)))


def mask_url(url: str) -> str:
    """The URL with its password (and secret query values) hidden: postgresql://user:***@host/db."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses: mask the user-info part by pattern
        return URL_USERINFO.sub(rf"\g<head>{MASK}", url)
    secret_query = [k for k in parsed.query if SECRET_QUERY.search(k)]
    if parsed.password is None and not secret_query:
        return url
    if secret_query:
        parsed = parsed.update_query_dict({k: MASK for k in secret_query})
    return parsed.render_as_string(hide_password=True).replace(quote(MASK), MASK)


def has_password(url: str) -> bool:
    """True when url carries a password (or a secret query value) that is not already masked."""
    try:
        make_url(url)
    except Exception:  # noqa: BLE001
        return URL_USERINFO.search(url) is not None and mask_url(url) != url
    return bool(url_secrets(url) - {MASK, quote(MASK, safe="")})


def url_secrets(url: str) -> set[str]:
    """The password (raw and percent-encoded) and secret query values a URL holds."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        return set()
    found = {parsed.password} if parsed.password else set()
    found |= {str(v) for k, v in parsed.query.items() if SECRET_QUERY.search(k)}
    return found | {quote(s, safe="") for s in found}


def remember(url_or_value: str | None) -> None:
    """Mask this value (or the password inside this URL) in everything this process writes or prints from now on."""
    if url_or_value:
        _known.update(url_secrets(url_or_value) if "://" in url_or_value else {url_or_value})


def secret_values() -> list[str]:
    """Values to mask anywhere they appear, longest first: secret-named env vars, storage passwords met so far."""
    found = set(_known)
    for name, value in os.environ.items():
        if name == STORAGE_ENV:
            found |= url_secrets(value)
        elif SECRET_NAME.search(name) and not NOT_SECRET_NAME.search(name):
            found.add(value)
    return sorted((v for v in found if len(v) >= MIN_LEN and v != MASK), key=len, reverse=True)


def mask(text: str) -> str:
    """text with every URL password, `password=...` value and known secret value replaced by ***."""
    if not isinstance(text, str) or not text:
        return text
    if "://" in text:
        text = URL_IN_TEXT.sub(lambda m: mask_url(m.group()), text)
    text = KEY_VALUE.sub(lambda m: m["key"] + MASK, text)
    for value in secret_values():
        if value in text:
            text = text.replace(value, MASK)
    return text


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def scrub_argv(argv: list[str]) -> list[str]:
    """argv with a storage password moved to $LORA_SEARCH_STORAGE and the override's URL masked.

    A URL with a password in any other override is refused: nothing else could read it back.
    """
    out, problems = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        name, value = key.lstrip("+~"), _unquote(value)
        urls = [u for u in URL_IN_TEXT.findall(value) if has_password(u)] if sep else []
        if not urls:
            out.append(arg)
        elif name == STORAGE_KEY and urls == [value]:
            os.environ[STORAGE_ENV] = value
            remember(value)
            out.append(f"{key}='{mask_url(value)}'")
        else:
            problems.append(f"{name}: a password inside a URL is accepted only in {STORAGE_KEY} (or "
                            f"${STORAGE_ENV}); got {mask(value)!r}")
            out.append(f"{key}={mask(value)}")
    if problems:
        raise ConfigError(problems)
    return out


class _MaskedStream:
    """A text stream that masks secrets in everything written to it (composition: the rest is the stream's own)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        self._stream.write(mask(text))
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _masking_factory(make_record):
    def factory(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            record.msg, record.args = mask(record.getMessage()), ()
            if record.exc_info and not record.exc_text:
                record.exc_text = mask("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        except Exception:  # noqa: BLE001 - a malformed log call keeps logging's own behaviour
            pass
        return record
    factory.masks_secrets = True
    return factory


def install() -> None:
    """Mask secrets in every log record and in all that is written to stdout/stderr by this process."""
    if not getattr(logging.getLogRecordFactory(), "masks_secrets", False):
        logging.setLogRecordFactory(_masking_factory(logging.getLogRecordFactory()))
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _MaskedStream):
            setattr(sys, name, _MaskedStream(stream))


def guard(argv: list[str]) -> list[str]:
    """What main() runs before anything else: install the masks and return the scrubbed argv (sys.argv too)."""
    install()
    argv = scrub_argv(list(argv))
    sys.argv = [sys.argv[0], *argv]
    return argv
