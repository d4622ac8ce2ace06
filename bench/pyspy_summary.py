"""Summarise py-spy's collapsed stacks (`py-spy record -f raw`): the functions with the largest
inclusive and self share of samples, optionally for the main (event-loop) thread only.

    python bench/pyspy_summary.py profile.txt [--top 30] [--thread MainThread] [--match app/]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


PROJECT_ROOT = str(Path(__file__).resolve().parent.parent) + "/"


def short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", PROJECT_ROOT, "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--thread", default=None, help="only stacks whose thread frame contains this text")
    parser.add_argument("--match", default=None, help="only functions whose file contains this text")
    parser.add_argument("--categories", action="store_true",
                        help="also split the samples into the gateway's cost centres (first rule that matches)")
    args = parser.parse_args()
    categories: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.path, encoding="utf-8", errors="replace") as handle:
        lines = handle.readlines()
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        threads[frames[0]] += count
        if args.thread and args.thread not in frames[0]:
            continue
        total += count
        names = [short(f) for f in frames[1:]] or [frames[0]]
        for name in set(names):
            if args.match is None or args.match in name:
                inclusive[name] += count
        own[names[-1]] += count
        categories[category(frames[1:], names)] += count
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples" + (f" (thread {args.thread})" if args.thread else ""))
    print("root frames:", ", ".join(f"{t} {c / sum(threads.values()):.0%}" for t, c in threads.most_common(6)))
    print(f"\n{'incl%':>6}  function (inclusive)")
    for name, count in inclusive.most_common(args.top):
        print(f"{100 * count / total:6.1f}  {name}")
    print(f"\n{'self%':>6}  function (self)")
    for name, count in own.most_common(args.top):
        print(f"{100 * count / total:6.1f}  {name}")
    if args.categories:
        print(f"\n{'share':>6}  cost centre")
        for name, count in categories.most_common():
            print(f"{100 * count / total:6.1f}  {name}")
    return 0


# Coroutine frames resumed by uvloop's C loop start their own stacks, so a rule looks at every
# frame of a sample, not at its root.
RULES = [
    ("reconciler (background polls)", lambda fs, ns: any("Reconciler" in f for f in fs)),
    ("webhook deliverer / archiver (background)", lambda fs, ns: any("Deliverer" in f or "Archiver" in f for f in fs)),
    ("aiosqlite hand-off to its thread (queue put + wake-up)", lambda fs, ns: ns[-1].startswith("Connection._execute (aiosqlite")),
    ("SQLAlchemy + aiosqlite, Python side", lambda fs, ns: any("sqlalchemy/" in f or "aiosqlite/" in f for f in fs)),
    ("upstream call (httpx / httpcore / aiohttp)", lambda fs, ns: any(x in f for f in fs for x in ("httpx/", "httpcore/", "aiohttp/"))),
    ("logging (JSON + scrubbing)", lambda fs, ns: any("logging/" in f or "app/logging.py" in f for f in fs)),
    ("thread pool for sync dependencies (anyio)", lambda fs, ns: any("anyio/to_thread" in f or "run_in_threadpool" in f or "CapacityLimiter" in f for f in fs)),
    ("event loop itself (uvloop C code: epoll, sockets, callbacks)", lambda fs, ns: ns[-1].startswith("Runner.run")),
    ("HTTP server + FastAPI/Starlette + app code", lambda fs, ns: True),
]


def category(frames: list[str], names: list[str]) -> str:
    for name, rule in RULES:
        if frames and rule(frames, names):
            return name
    return "other"


if __name__ == "__main__":
    sys.exit(main())
