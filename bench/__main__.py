"""`python -m bench [proxy] [offload] [herd] [fill] [ranges] [load] [--quick]`: run bloblo's
benchmarks against real processes on loopback, print the results and write them as markdown
(`--output`)."""

from __future__ import annotations

import argparse
import datetime
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import fill, herd, load, machine, offload, proxy, ranges
from bench.report import render

BENCHMARKS = {
    "proxy": proxy.run,
    "offload": offload.run,
    "herd": herd.run,
    "fill": fill.run,
    "ranges": ranges.run,
    "load": load.run,
}
HERE = Path(__file__).resolve().parent
FULL_OUTPUT = HERE / "results-latest.md"  # committed: docs/benchmarks.md quotes it
PARTIAL_OUTPUT = HERE / "results-scratch.md"  # --quick or some benchmarks only (gitignored)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: which benchmarks, how big, where the markdown goes."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all, in that order)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller blobs")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"markdown file (default: {FULL_OUTPUT.name} after a full run of every benchmark, "
        f"else {PARTIAL_OUTPUT.name}, both in {HERE})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the stack's processes")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.benchmarks) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    args.benchmarks = list(dict.fromkeys(args.benchmarks)) or list(BENCHMARKS)
    if args.output is None:
        complete = not args.quick and set(args.benchmarks) == set(BENCHMARKS)
        args.output = FULL_OUTPUT if complete else PARTIAL_OUTPUT
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks in a fresh temporary directory; print and write the report."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("bench").setLevel(logging.INFO)
    workdir = Path(tempfile.mkdtemp(prefix="bloblo-bench-"))
    sections = []
    try:
        preamble = machine.describe()
        for name in args.benchmarks:
            started = time.monotonic()
            section = BENCHMARKS[name](workdir / name, quick=args.quick)
            section.seconds = time.monotonic() - started
            sections.append(section)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    mode = "--quick" if args.quick else "full"
    text = render(f"bloblo benchmarks ({mode} run, {when})", preamble, sections)
    print(text)
    args.output.write_text(text)
    print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
