"""Issue #8, part 1: `pip install .` brings the library and the `bloblo` command with runtime
dependencies only; the test and demo tools come from a lock of their own.

Installs into a fresh venv from the same package index `make install` uses (about 15 s)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# What only the tests and the demo stack use: none of it may come with `pip install .`.
TEST_TOOLS = {"pytest", "ruff", "moto", "bcrypt", "pyjwt", "hypothesis", "psutil", "cryptography"}


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_pip_install_brings_the_runtime_lock_and_no_test_tool(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools builds in the tree it installs from
    shutil.copytree(
        REPO / "bloblo", source / "bloblo", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "--quiet", "-c", str(REPO / "requirements.lock"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    freeze = subprocess.run(
        [*pip, "freeze", "--exclude", "bloblo"], capture_output=True, text=True, check=True
    )
    installed = {
        canonicalize_name(line.split("==")[0]): line.split("==")[1]
        for line in freeze.stdout.splitlines()
    }
    assert installed == _pins(REPO / "requirements.lock")  # exactly the runtime lock
    assert not TEST_TOOLS & installed.keys()

    version = subprocess.run(
        [str(venv / "bin" / "bloblo"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.strip() == "bloblo, version 0.1.0", version.stderr


def test_the_test_lock_holds_the_test_tools_and_nothing_of_the_runtime_lock():
    runtime, test = _pins(REPO / "requirements.lock"), _pins(REPO / "requirements-test.lock")
    assert test.keys() >= TEST_TOOLS
    assert not runtime.keys() & test.keys()
    declared = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.metadata as m; print(*m.requires('bloblo'), sep='\\n')",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for requirement in map(Requirement, declared):
        name = canonicalize_name(requirement.name)
        if requirement.marker is None:  # a runtime dependency, pinned in the runtime lock
            assert name in runtime and name not in TEST_TOOLS, requirement
        else:  # extra == "test"
            assert name in test, requirement


def _make_commands(target: str) -> str:
    """The commands `make TARGET` would run from scratch (-B: as if nothing were built)."""
    return subprocess.run(
        ["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


def test_make_install_is_the_runtime_alone_and_make_test_adds_the_tools():
    install = _make_commands("install")
    assert "requirements.lock" in install and "pip install --quiet --no-deps -e ." in install
    for tool in ("requirements-test.lock", "apt-get", "localstack"):
        assert tool not in install, f"make install brings {tool}"
    test = _make_commands("test")
    for tool in ("requirements-test.lock", "docker-registry", "localstack"):
        assert tool in test, f"make test lacks {tool}"
