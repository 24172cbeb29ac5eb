"""`nanopipe verify`: check every committed file of a store against its manifest.

Every file of every committed stage dir (or of the stages named) is read in full and hashed,
in a thread pool (hashlib and fsspec's reads release the GIL, so local disks and S3 alike are
read in parallel), largest files first. Each bad file gets one line as it is found:

    BAD data/ab12cd34ef56ab78/train/shard_00003.parquet: sha256 mismatch (manifest 1a2b…, found 9f8e…)

and a damaged manifest.json is a bad file too. Long runs print progress (files and bytes
done) every few seconds; the last line sums up. Nothing is memoized: this is the full check.
"""

from __future__ import annotations

import posixpath
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

from nanopipe.store import Store


@dataclass
class Verdict:
    dirs: int = 0  # committed stage dirs looked at (damaged ones included)
    files: int = 0  # files hashed
    bytes: int = 0
    bad: list[str] = field(default_factory=list)  # "path: problem", path relative to the store root


def verify_store(store: Store, stages: list[str] | None = None, jobs: int = 8,
                 on_bad: Callable[[str], None] = lambda line: None,
                 on_progress: Callable[[int, int, int, int], None] | None = None, every_s: float = 5.0) -> Verdict:
    """Hash every committed file of `stages` (default: every stage in the store) against its manifest.
    on_bad(line) hears of each bad file as it is found; on_progress(files, of, bytes, of) every every_s."""
    damaged: list[tuple[str, str]] = []
    manifests = [m for s in (stages or [None]) for m in store.manifests(s, bad=damaged)]
    verdict = Verdict(dirs=len(manifests) + len(damaged))

    def report(path: str, problem: str) -> None:
        line = f"{posixpath.relpath(path, store.root)}: {problem}"
        verdict.bad.append(line)
        on_bad(line)

    for path, problem in damaged:
        report(path, problem)
    work = sorted(((m, f) for m in manifests for f in m["files"]), key=lambda mf: -mf[1]["bytes"])
    total = sum(f["bytes"] for _, f in work)
    read = [0]
    lock = threading.Lock()

    def count(n: int) -> None:
        with lock:
            read[0] += n

    def check(m: dict, f: dict) -> str | None:
        try:
            return store.file_problem(m, f, count)
        except OSError as e:  # unreadable (permissions, a dropped connection): bad, and say why
            return f"cannot be read ({e})"

    last = time.monotonic()
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="nanopipe-verify") as pool:
        pending = {pool.submit(check, m, f): (m, f) for m, f in work}
        while pending:
            done, _ = wait(pending, timeout=every_s, return_when=FIRST_COMPLETED)
            for future in done:
                m, f = pending.pop(future)
                verdict.files += 1
                verdict.bytes += f["bytes"]
                problem = future.result()
                if problem:
                    report(store.path_of(m, f["path"]), problem)
            if on_progress and pending and time.monotonic() - last >= every_s:
                last = time.monotonic()
                on_progress(verdict.files, len(work), read[0], total)
    return verdict


def verify_main(store_url: str | None, stages: list[str], jobs: int) -> int:
    """`nanopipe verify`: print one line per bad file and a summary; returns the exit status (1: bad files)."""
    store = Store(store_url)
    t0 = time.time()

    def progress(files: int, of: int, done: int, total: int) -> None:
        print(f"verify: {files:,}/{of:,} files, {_size(done)} of {_size(total)} read "
              f"({100 * done / max(total, 1):.0f}%, {time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    v = verify_store(store, stages or None, jobs, on_bad=lambda line: print(f"BAD {line}", flush=True),
                     on_progress=progress)
    what = f"{v.files:,} files ({_size(v.bytes)}) in {v.dirs} committed stage dir(s) of {store.url}"
    if v.bad:
        print(f"verify: {len(v.bad)} bad of {what}, checked in {time.time() - t0:.1f}s")
        return 1
    print(f"verify: all {what} match their manifests ({time.time() - t0:.1f}s)")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
