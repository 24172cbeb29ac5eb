"""The data stage's throughput, and how long the d20 data stage takes on a bigger node.

    python bench/data_stage.py [--files 2] [--chars-per-file 40000000] [--cores 16]

Makes FineWeb-EDU-like parquet files (documents of ~4.1K characters on average, lognormal lengths,
cut from the offline sample's real English; row groups of 1,024, zstd, as nanochat's repackaged
shards), runs the real data stage on them (source kind `local`: no download), and measures:
- chars/s end to end, here;
- process CPU seconds per character (every thread: reading, hashing, writing shards), and the main
  thread's alone: the stage's serial part (documents stream through one Python loop).
On a node with N cores the stage takes at best max(serial, all CPU / N) per character (the shard
writers run in threads beside the loop), at worst all CPU on one core (were everything held by the
GIL): for the d20 preset's 240 files x 250M chars that range is the extrapolation printed
(downloads not included: they run at the network's speed, beside the tokenizer as in nanochat).

Last line: RESULT chars_per_s=<here> cpu_chars_per_s=<per CPU second> serial_chars_per_s=<main thread>
d20_minutes_<N>_cores=<best>-<worst>
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanopipe import sizing  # noqa: E402
from nanopipe.config import load_config  # noqa: E402
from nanopipe.data.sources import SourceConfig, open_source  # noqa: E402
from nanopipe.runner import run_pipeline  # noqa: E402
from nanopipe.store import Store  # noqa: E402


def make_files(folder: Path, files: int, chars_per_file: int, seed: int = 0) -> int:
    text = "\n\n".join(open_source(SourceConfig(kind="sample")).documents())
    rng = random.Random(seed)
    total = 0
    for f in range(files):
        docs, n = [], 0
        while n < chars_per_file:
            size = int(min(60_000, max(200, rng.lognormvariate(8.0, 0.8))))
            start = rng.randrange(0, len(text) - size)
            docs.append(text[start:start + size])
            n += size
        pq.write_table(pa.table({"text": docs}), folder / f"shard_{f:05d}.parquet", row_group_size=1024,
                       compression="zstd")
        total += n
    return total


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--chars-per-file", type=int, default=40_000_000)
    ap.add_argument("--cores", type=int, default=16)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        chars = make_files(src, a.files, a.chars_per_file)
        cfg = load_config("d20", ["data.source.kind=local", f'data.source.paths=["{src}/*.parquet"]'])
        # a first, small run loads what the stage imports (torch among them, through the code identity),
        # so that the measured run counts per-character work only
        run_pipeline(Store(f"{tmp}/warm"), load_config("d20", ["data.source.kind=local", f'data.source.paths=["{src}/*.parquet"]',
                                                               "data.source.max_chars=1000000"]), ["data"], log=lambda s: None)
        lines: list[str] = []
        t0, c0, m0 = time.perf_counter(), cpu_seconds(), time.thread_time()
        run_pipeline(Store(f"{tmp}/store"), cfg, ["data"], log=lines.append)
        wall, cpu, serial = time.perf_counter() - t0, cpu_seconds() - c0, time.thread_time() - m0
    print(next(line for line in lines if "M chars/s" in line))
    here, per_cpu, per_serial = chars / wall, chars / cpu, chars / serial
    d20 = sizing.source_chars("fineweb-edu", sizing.GPU_RECIPES["d20"].fineweb_files)
    node_rate = min(per_serial, per_cpu * a.cores)
    minutes, worst = d20 / node_rate / 60, d20 / per_cpu / 60
    print(f"{chars / 1e6:.0f}M chars in {wall:.1f}s: {here / 1e6:.1f}M chars/s here; {cpu:.1f} CPU-s "
          f"({per_cpu / 1e6:.1f}M chars per CPU-s), main thread {serial:.1f} CPU-s ({per_serial / 1e6:.1f}M chars/s: "
          f"the serial part)")
    print(f"d20 ({d20 / 1e9:.0f}B chars) on {a.cores} cores: min(serial {per_serial / 1e6:.0f}M, "
          f"{a.cores} x {per_cpu / 1e6:.1f}M) = {node_rate / 1e6:.0f}M chars/s -> {minutes:.1f} min; "
          f"at worst (all on one core, {per_cpu / 1e6:.1f}M chars/s) {worst:.1f} min")
    print(f"RESULT chars_per_s={here:.0f} cpu_chars_per_s={per_cpu:.0f} serial_chars_per_s={per_serial:.0f} "
          f"d20_minutes_{a.cores}_cores={minutes:.1f}-{worst:.1f}")


if __name__ == "__main__":
    main()
