"""What the benchmarks ran on: CPU, cores, memory, tool versions, and how fast this machine
hashes (SHA-256 bounds what bloblo can verify per second on a miss)."""

from __future__ import annotations

import os
import platform
import subprocess

import psutil

from bench.measure import GIB, MB, sha256_throughput

VERSION_COMMANDS = {
    "docker-registry": ["/usr/bin/docker-registry", "--version"],
    "skopeo": ["/usr/bin/skopeo", "--version"],
    "curl": ["/usr/bin/curl", "--version"],
}


def cpu_model() -> str:
    """The CPU's model name as lscpu reports it (or platform's guess)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "missing"
    return out.splitlines()[0].split(" (")[0].strip() if out else "unknown"


def describe() -> list[str]:
    """Markdown lines describing this machine and its SHA-256 speed (measured now)."""
    cores = os.cpu_count()
    memory = psutil.virtual_memory().total / GIB
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"- Machine: {cpu_model()}, {cores} cores (`nproc`), {memory:.0f} GiB memory, "
        f"Linux {platform.release()}, load average at start {load}",
        f"- SHA-256 in one core (hashlib, 1 MiB updates): {sha256_throughput() / MB:,.0f} MB/s",
        f"- Python {platform.python_version()}",
    ]
    lines += [f"- {name}: {_version(argv)}" for name, argv in VERSION_COMMANDS.items()]
    return lines
