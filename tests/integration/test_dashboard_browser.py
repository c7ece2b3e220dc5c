"""The dashboard in a real browser: headless Chromium renders the study list, the study and its trials."""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import pytest

from tests.unit.test_dashboard import free_port, make_study, running_dashboard

pytestmark = pytest.mark.slow


def rendered_text(browser: str, url: str, profile) -> str:
    """The page's text after its scripts ran, from `chromium --headless --dump-dom`."""
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", proc.stdout, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def test_chromium_shows_the_study_and_its_trials(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary on PATH")
    make_study(tmp_path / "results")
    port = free_port()
    with running_dashboard(tmp_path, port) as (_, studies):
        study_id = studies["study_summaries"][0]["study_id"]
        base = f"http://127.0.0.1:{port}/dashboard"
        listing = rendered_text(browser, f"{base}/", tmp_path / "profile")
        assert "rank_lr" in listing, listing[:2000]
        study = rendered_text(browser, f"{base}/studies/{study_id}", tmp_path / "profile")
        assert f"rank_lr (id={study_id})" in study, study[:2000]
        assert "Best Trial (number=3)" in study and "lora.r: 8" in study, study[:2000]
        trials = rendered_text(browser, f"{base}/studies/{study_id}/trials", tmp_path / "profile")
        assert "4 Trials" in trials and "Trial 2 Pruned" in trials, trials[:2000]
