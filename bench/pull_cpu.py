"""Where a cold pull's time goes: per round, one fresh image (4 x 128 MiB) pulled cold through
bloblo and through the peer (the offload benchmark's stack), with the CPU seconds each program
spent during each pull and how busy the machine was.

    .venv/bin/python -m bench.pull_cpu [ROUNDS]

Not part of `make bench`: a diagnosis. It showed that a cold pull keeps both cores busy for its
whole time (so a pull takes the CPU of every program in it, halved), and how much of that the
S3 server took while bloblo's uploads ran alongside the pull (docs/benchmarks.md).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.measure import MIB, cpu_seconds, settle_disk
from bench.offload import REPO, USER, _timed_pull, _warm_up, running_stack
from tests.stack.images import build_image, push, unique_tag

PATHS = ("bloblo", "peer")
SETTLE_SECONDS = 8.0  # after a pull, the uploads it started are over before the next push


def _busy() -> float:
    times = psutil.cpu_times()
    return times.user + times.system + times.irq + times.softirq


def main(rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bloblo-pull-cpu-"))
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    try:
        with running_stack(work) as stack:
            _warm_up(stack, work / "warm-up")
            s3 = psutil.Process(stack.s3.process.pid)
            programs = {
                "bloblo": stack.bloblo.worker_pids(),
                "peer": [stack.peer.process.pid],
                "localstack": [s3.pid] + [child.pid for child in s3.children(recursive=True)],
                "upstream": [stack.upstream.process.pid],
            }
            for index in range(rounds):
                for path in PATHS if index % 2 == 0 else PATHS[::-1]:
                    image_dir = work / f"round{index}-{path}"
                    image = build_image(
                        image_dir, [128 * MIB] * 4, tag=unique_tag(), compresslevel=0
                    )
                    push(image, stack.upstream.host, REPO, creds=USER)
                    settle_disk()
                    before = {name: cpu_seconds(pids) for name, pids in programs.items()}
                    busy_before = _busy()
                    took, _ = _timed_pull(stack, path, image, work / "pull")
                    busy = _busy() - busy_before
                    spent = {
                        name: cpu_seconds(pids) - before[name] for name, pids in programs.items()
                    }
                    seconds[path].append(took)
                    print(
                        f"round {index + 1} {path:6s} {took:.2f} s; machine busy {busy:.2f} of "
                        f"{2 * took:.2f} core-seconds; "
                        + ", ".join(f"{name} {cpu:.2f}" for name, cpu in spent.items()),
                        flush=True,
                    )
                    shutil.rmtree(image_dir)
                    time.sleep(SETTLE_SECONDS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = [a / b for a, b in zip(seconds["bloblo"], seconds["peer"], strict=True)]
    print("bloblo / peer per round:", ", ".join(f"{r:.2f}" for r in ratios))
    print(f"median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
