"""No log handler is left holding a dead stream: two commands in one process (and tests, whose capture streams
close when each ends) log without '--- Logging error ---', and nothing closes the real stderr."""

from __future__ import annotations

import logging
import sys

import pytest
from torch._logging._internal import LazyTraceHandler

from lora_search.commands import pipeline
from tests.conftest import _repoint_stray_stream_handlers


def test_a_handler_that_owns_its_stream_is_left_alone_and_cannot_close_the_real_stderr():
    lazy = LazyTraceHandler(None)  # torch's trace-file handler: no stream until it logs, its own file then
    logging.getLogger("torch.__trace_test").addHandler(lazy)
    try:
        _repoint_stray_stream_handlers()
        assert lazy.stream is None
        lazy.close()  # what Hydra's logging setup does to every handler
        assert not sys.__stderr__.closed
    finally:
        logging.getLogger("torch.__trace_test").removeHandler(lazy)


def test_a_handler_bound_to_a_tests_capture_stream_is_pointed_at_the_real_stderr(capsys):
    from lora_search.core import masking

    bound = logging.StreamHandler(masking._MaskedStream(sys.stderr))  # what basicConfig does after masking.install
    _repoint_stray_stream_handlers()
    assert bound.stream is sys.__stderr__


@pytest.mark.parametrize("code", [3])
def test_two_commands_in_one_process_log_without_a_logging_error(monkeypatch, tmp_path, capfd, code):
    from lora_search import __main__ as cli

    monkeypatch.setattr(pipeline, "run", lambda cfg, overrides=(): logging.getLogger("optuna").warning("ran") or code)
    for i in range(2):
        with pytest.raises(SystemExit):
            cli.main(["sweep=nightly", "model=tiny_llama", f"results_dir={tmp_path}", "tracking=none",
                      f"hydra.run.dir={tmp_path / str(i)}"])
        _repoint_stray_stream_handlers()  # as after every test
    logging.getLogger("optuna").warning("after both")
    err = capfd.readouterr().err
    assert not sys.__stderr__.closed
    assert "Logging error" not in err and "after both" in err
