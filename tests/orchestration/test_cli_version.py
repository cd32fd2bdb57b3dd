"""``onegen --version`` names the installed version, the one pyproject.toml declares."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import REPO


def test_version_is_the_projects():
    want = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"onegen {want}"
