"""Provenance names our own commit only for a checkout: an installed copy inside the user's repository records none."""

from __future__ import annotations

import subprocess

from lora_search.core import hardware


def test_an_installed_copy_inside_a_users_repository_records_no_commit(tmp_path, monkeypatch):
    repo = tmp_path / "their_repo"
    installed = repo / ".venv" / "lib" / "site-packages" / "lora_search" / "core"
    installed.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "theirs"], check=True)
    monkeypatch.setattr(hardware, "__file__", str(installed / "hardware.py"))
    assert hardware.git_revision() is None


def test_the_checkout_records_its_commit():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=hardware.Path(hardware.__file__).parents[2],
                          capture_output=True, text=True).stdout.strip()
    assert hardware.git_revision().split("+")[0] == head
