"""Issue #8, part 6: deploy/bloblo.service is a valid unit (`systemd-analyze verify`), hardened to
an exposure of 4.0 or lower (`systemd-analyze security --offline=true`), keeps what bloblo needs,
and lets bloblo write every directory it writes.

Needs the `systemd-analyze` command (Debian's `systemd` package), not a running systemd: without
it these tests fail, they do not skip."""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "bloblo.service"
ENV_EXAMPLE = REPO / "deploy" / "bloblo.env.example"
GUNICORN_CONF = REPO / "gunicorn.conf.py"
INSTALL_DIR = "/opt/bloblo"  # where the unit expects the checkout
MAX_EXPOSURE = 4.0
NEEDED_FAMILIES = {"AF_INET", "AF_INET6", "AF_UNIX"}  # TCP in and out; journald and sd_notify
TRUE = {"1", "yes", "y", "true", "t", "on"}
# Where systemd creates (and makes writable, owned by User=) the directories these settings name.
CREATED_UNDER = {
    "RuntimeDirectory": "/run",
    "StateDirectory": "/var/lib",
    "CacheDirectory": "/var/cache",
    "LogsDirectory": "/var/log",
}


# --- helpers ------------------------------------------------------------------------------------


def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    """Run systemd-analyze (no colours, C locale); fail clearly when it is not installed."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail(
            "systemd-analyze not found: install Debian's `systemd` package (`apt-get install "
            "systemd`, or `make install` with systemd in the Makefile's APT_PACKAGES); these "
            "tests need the command, not a running systemd",
            pytrace=False,
        )
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C"}
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def verify_problems(unit_text: str, tmp_path: Path) -> list[str]:
    """What `systemd-analyze verify` reports about bloblo.service written as `unit_text`.

    The unit runs /opt/bloblo/.venv/bin/gunicorn, which a test host lacks, and verify rejects a
    unit whose command is not executable. Rather than accept that one message (which would also
    hide a mistyped ExecStart=), the copy verified has /opt/bloblo replaced by a link to this
    checkout, where `make install` made .venv/bin/gunicorn: the command line is checked as
    written, relative to the checkout. verify, offline, checks neither User= nor
    EnvironmentFile=, so nothing else needs rewriting.

    verify exits 0 on a setting it merely ignores (a misspelt key, a bad value), printing a
    warning: so any line it prints about bloblo.service is a problem, and so is a non-zero exit.
    Lines about other units (the host's own) are not ours to judge.
    """
    checkout = tmp_path / "opt-bloblo"
    checkout.symlink_to(REPO, target_is_directory=True)
    assert not re.search(r"\s", str(checkout)), "a path with blanks would change the command line"
    unit = tmp_path / "bloblo.service"
    unit.write_text(unit_text.replace(INSTALL_DIR, str(checkout)))
    result = systemd_analyze("verify", "--man=no", str(unit))
    output = (result.stdout + result.stderr).strip()
    problems = [line for line in output.splitlines() if "bloblo.service" in line]
    if result.returncode != 0 and not problems:
        problems = [f"systemd-analyze verify exited {result.returncode}: {output}"]
    return problems


def exposure(unit: Path) -> tuple[float, str]:
    """`systemd-analyze security --offline=true` on unit: its overall exposure, and its report."""
    result = systemd_analyze("security", "--offline=true", str(unit))
    report = result.stdout + result.stderr
    pattern = rf"Overall exposure level for {re.escape(unit.name)}:\s*(\d+(?:\.\d+)?)"
    match = re.search(pattern, report)
    assert match, f"no overall exposure level in the report (exit {result.returncode}):\n{report}"
    return float(match.group(1)), report


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values in order, read the way systemd reads a unit file: blank lines
    and comments (# or ;) skipped, a trailing backslash joins the next line, a key may repeat,
    and an empty assignment resets the values given before it. (configparser would refuse the
    repeated keys.)"""
    lines, pending = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if line[:1] in ("#", ";") or (pending is None and not line):
            continue  # comments are skipped inside a continued line too
        if line.endswith("\\"):
            pending = (pending or "") + line[:-1] + " "
            continue
        lines.append((pending or "") + line)
        pending = None
    if pending is not None:
        lines.append(pending)

    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in lines:
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
            continue
        assert section is not None and "=" in line, f"not a unit file line: {line!r}"
        key, value = (part.strip() for part in line.split("=", 1))
        section[key] = section.get(key, []) + [value] if value else []
    return sections


def last(service: dict[str, list[str]], key: str, default: str = "") -> str:
    """The value of a single-valued setting: its last assignment."""
    values = service.get(key, [])
    return values[-1] if values else default


def words(service: dict[str, list[str]], key: str) -> list[str]:
    """Every word of a list-valued setting, over all its assignments."""
    return [word for value in service.get(key, []) for word in value.split()]


def environment(service: dict[str, list[str]]) -> dict[str, str]:
    """The variables Environment= sets (quotes as in the unit: "A=b c" D=e)."""
    env = {}
    for value in service.get("Environment", []):
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


def writable_roots(service: dict[str, list[str]]) -> dict[PurePosixPath, str]:
    """Each path the unit lets the service write, with the setting that does it."""
    roots = {
        PurePosixPath(base) / name: key
        for key, base in CREATED_UNDER.items()
        for name in words(service, key)
    }
    for path in words(service, "ReadWritePaths"):
        roots[PurePosixPath(path.lstrip("-+"))] = "ReadWritePaths"
    if last(service, "PrivateTmp").lower() in TRUE:
        roots[PurePosixPath("/tmp")] = roots[PurePosixPath("/var/tmp")] = "PrivateTmp"
    return roots


def created_dirs(service: dict[str, list[str]]) -> set[PurePosixPath]:
    """The directories that exist when the service starts because the unit creates them."""
    created = {
        PurePosixPath(base) / name
        for key, base in CREATED_UNDER.items()
        for name in words(service, key)
    }
    if last(service, "PrivateTmp").lower() in TRUE:
        created |= {PurePosixPath("/tmp"), PurePosixPath("/var/tmp")}
    return created


def heartbeat_dir(env: dict[str, str]) -> str:
    """Where gunicorn's workers keep their heartbeat files: worker_tmp_dir in gunicorn.conf.py,
    or else the temporary directory (tempfile: $TMPDIR, else /tmp)."""
    match = re.search(r"^worker_tmp_dir\s*=\s*(.+)$", GUNICORN_CONF.read_text(), re.MULTILINE)
    if match is None:
        return env.get("TMPDIR", "/tmp")
    try:
        return ast.literal_eval(match.group(1).split("#", 1)[0].strip())
    except (ValueError, SyntaxError):
        pytest.fail(f"gunicorn.conf.py: {match.group(0)!r} is not a literal: update this test")


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    """The unit's [Service] section."""
    return parse_unit(UNIT.read_text())["Service"]


# --- verify -------------------------------------------------------------------------------------


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    assert verify_problems(UNIT.read_text(), tmp_path) == []


@pytest.mark.parametrize(
    ("good", "broken"),
    [
        ("\nProtectSystem=strict\n", "\nProtectSytem=strict\n"),  # a misspelt key: exit 0
        ("\nType=notify\n", "\nType=notifyy\n"),  # a bad value: exit 0
        ("\n[Service]\n", "\n[Servce]\n"),  # a misspelt section: no ExecStart= left
        ("/.venv/bin/gunicorn ", "/.venv/bin/gunicorm "),  # a command that does not exist
    ],
    ids=["misspelt-key", "bad-value", "misspelt-section", "missing-command"],
)
def test_verify_rejects_a_broken_copy_of_the_unit(tmp_path, good, broken):
    """The check above is not vacuous: each of these mistakes in the unit is reported."""
    text = UNIT.read_text()
    assert good in text, f"the unit no longer has {good.strip()!r}: pick another mistake"
    assert verify_problems(text.replace(good, broken, 1), tmp_path) != []


# --- security -----------------------------------------------------------------------------------


def test_the_units_exposure_is_at_most_4():
    level, report = exposure(UNIT)
    exposed = "\n".join(line for line in report.splitlines() if line.startswith("✗"))
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}; still exposed:\n{exposed}"


def test_the_exposure_check_fails_an_unhardened_unit(tmp_path):
    """The figure parsed is the real one: a unit with no sandbox rates well above 4.0."""
    unit = tmp_path / "bloblo.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    level, _ = exposure(unit)
    assert level > MAX_EXPOSURE


def test_the_sandbox_keeps_what_bloblo_needs(service):
    """Hardening must not cut bloblo off: TCP to the registry and S3 wherever they are, and its
    listening port; AF_UNIX for journald and sd_notify; the configuration file."""
    families = words(service, "RestrictAddressFamilies")
    assert not any(family.startswith("~") for family in families), "expected an allow-list"
    missing = NEEDED_FAMILIES - set(families)
    assert not missing, f"RestrictAddressFamilies= lacks {missing}"
    assert "IPAddressDeny" not in service, "bloblo must reach the registry and S3"
    assert last(service, "PrivateNetwork").lower() not in TRUE
    assert last(service, "Type") == "notify" and last(service, "NotifyAccess") == "main"
    assert last(service, "EnvironmentFile") == "/etc/bloblo/bloblo.env"
    # Everything outside the writable directories below is read-only to bloblo.
    assert last(service, "ProtectSystem") == "strict"


# --- writable directories -----------------------------------------------------------------------


def _writable_by(path: str, roots: dict[PurePosixPath, str]) -> str | None:
    """The setting that makes `path` writable, or None."""
    target = PurePosixPath(path)
    assert target.is_absolute() and ".." not in target.parts, f"not a plain absolute path: {path}"
    for root, key in roots.items():
        if target == root or root in target.parents:
            return key
    return None


def test_every_directory_bloblo_writes_is_writable_and_exists(service):
    env = environment(service)
    tmp = env.get("TMPDIR", "/tmp")
    assert "PROMETHEUS_MULTIPROC_DIR" in env, "the unit names no metrics directory"
    writes = {
        # Fills spool here; bloblo refuses to start unless it exists.
        "BLOBLO_SPOOL_DIR": env.get("BLOBLO_SPOOL_DIR", tmp),
        # prometheus-client's multiprocess mode: one file per worker, the directory must exist.
        "PROMETHEUS_MULTIPROC_DIR": env["PROMETHEUS_MULTIPROC_DIR"],
        "gunicorn's worker heartbeat files": heartbeat_dir(env),
    }
    roots = writable_roots(service)
    created = created_dirs(service)
    for what, path in writes.items():
        assert _writable_by(path, roots), f"{what}: {path} is read-only in the unit"
        assert PurePosixPath(path) in created, f"{what}: the unit does not create {path}"


def test_the_directories_the_env_example_suggests_are_writable(service):
    """bloblo.env overrides Environment=: the values it suggests must work in the unit too."""
    roots = writable_roots(service)
    suggested = re.findall(
        r"^#?\s*(BLOBLO_SPOOL_DIR|PROMETHEUS_MULTIPROC_DIR|TMPDIR)=(/[^\s;,)]*)",
        ENV_EXAMPLE.read_text(),
        re.MULTILINE,
    )
    assert suggested, "the example suggests no directory: update this test"
    for name, path in suggested:
        assert _writable_by(path, roots), f"{ENV_EXAMPLE.name}: {name}={path} is read-only"


def test_the_unit_parser_reads_repeats_resets_and_continuations():
    unit = parse_unit(
        "# comment\n[Service]\nA=1\nA=2 3\n; other comment\nB=x\nB=\nB=y\nC=long \\\n"
        "# comment in a continuation\n  value\n"
    )
    assert unit == {"Service": {"A": ["1", "2 3"], "B": ["y"], "C": ["long  value"]}}


def test_the_units_spool_directory_is_bloblos_alone(service):
    """bloblo refuses a spool directory with group or other bits (issue #13, part 1): the unit
    makes /var/cache/bloblo 0700 and every file bloblo creates private."""
    env = environment(service)
    assert PurePosixPath(env["BLOBLO_SPOOL_DIR"]) == PurePosixPath("/var/cache") / last(
        service, "CacheDirectory"
    )
    assert int(last(service, "CacheDirectoryMode"), 8) & 0o077 == 0
    assert int(last(service, "UMask"), 8) & 0o077 == 0o077
