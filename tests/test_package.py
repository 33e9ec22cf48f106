"""ddist installs like a package: a built wheel carries the config tree and runs from any directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_a_wheel_runs_from_another_directory(tmp_path):
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("ddist-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable checkout

    def ddist(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "ddist", *args], cwd=elsewhere, env=env, check=True, capture_output=True, text=True
        ).stdout

    where = subprocess.run(
        [sys.executable, "-c", "import ddist; print(ddist.__file__)"],
        cwd=elsewhere,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(site))  # the installed copy, not the checkout
    assert "ddist: config-driven dataset distillation" in ddist("--help")
    job = ddist("--cfg", "job", "pipeline=sre2l")
    assert "name: sre2l" in job and "name: digits" in job
