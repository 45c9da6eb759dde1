"""The project's shell scripts (set-up, CI, the outside suites' runners) pass shellcheck.

They run on fresh machines and as root, where a quoting slip or an unset variable does
real damage; shellcheck finds those before a machine does. tools/setup.sh installs it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def shell_scripts() -> list[Path]:
    """Every tracked file that is a shell script: *.sh, and files whose first line names
    sh or bash."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if name.endswith(".sh"):
            found.append(path)
        elif path.is_file():
            with open(path, "rb") as f:
                first = f.readline()
            if first.startswith(b"#!") and (b"bash" in first or first.rstrip().endswith(b"/sh")):
                found.append(path)
    return found


def test_the_scripts_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in shell_scripts()}
    assert {".ci/run", "tools/setup.sh", "tools/test.sh", "tools/fsx.sh",
            "tools/lib/fresh_mount.sh"} <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shellcheck_finds_nothing(script: Path):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: tools/setup.sh installs it"
    # -x follows the files a script sources (their `# shellcheck source=` paths are
    # from the checkout's root).
    result = subprocess.run([shellcheck, "-x", script.relative_to(ROOT).as_posix()],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
