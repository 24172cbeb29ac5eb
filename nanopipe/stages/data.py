"""Stage 3: pretraining data — parquet shards with a `text` column, plus a validation shard.

Documents stream from the source in a deterministic order; each is sent to train or val by a
content hash (validation documents past max_val_docs go to train: nothing is dropped). Every
document the source yields is kept whole (the source's num_files or max_chars says how much
text; a max_chars budget ends after the document that reaches it), in train shards of
`docs_per_shard` written in parallel. Each finished shard appears atomically, so after a crash a
rerun adopts the shards already written and writes only the missing ones.

The metrics count train characters and documents: base_train turns them into the tokens it can
read (with its tokenizer's chars/token) and refuses a horizon that would repeat them.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from nanopipe.data.shards import is_validation, shard_name, write_shard
from nanopipe.data.sources import open_source
from nanopipe.faults import fault_point

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1


def run(ctx: "StageContext") -> dict:
    cfg = ctx.config
    w = ctx.writer
    source = open_source(cfg.source)
    t0 = time.time()
    stats = {"train_docs": 0, "train_chars": 0, "val_docs": 0, "val_chars": 0, "shards_written": 0, "shards_reused": 0}
    val_docs: list[str] = []
    pending: list[str] = []
    futures: list[Future] = []
    n_shards = 0

    def write(index: int, docs: list[str]) -> None:
        rel = shard_name("train", index)
        with w.local_tmp(".parquet") as tmp:
            write_shard(docs, tmp, cfg.row_group_size)
            w.put_file(tmp, rel)
        ctx.log(f"[data] wrote {rel} ({len(docs)} docs)")
        fault_point("data.shard")

    def flush(pool: ThreadPoolExecutor) -> None:
        nonlocal n_shards, pending
        if w.exists(shard_name("train", n_shards)):
            w.adopt(shard_name("train", n_shards))  # written by an earlier, interrupted attempt
            stats["shards_reused"] += 1
        else:
            futures.append(pool.submit(write, n_shards, pending))
            # Bound the shards held in memory: wait for the oldest writes before queuing more.
            while sum(not f.done() for f in futures) > 2 * cfg.workers:
                next(f for f in futures if not f.done()).result()
        n_shards += 1
        pending = []

    with ThreadPoolExecutor(cfg.workers) as pool:
        for doc in source.documents(whole=True):
            if doc.isspace():
                continue
            if len(val_docs) < cfg.max_val_docs and is_validation(doc, cfg.val_fraction):
                val_docs.append(doc)
                stats["val_docs"] += 1
                stats["val_chars"] += len(doc)
                continue
            pending.append(doc)
            stats["train_docs"] += 1
            stats["train_chars"] += len(doc)
            if len(pending) == cfg.docs_per_shard:
                flush(pool)
        if pending:
            flush(pool)
        for f in futures:
            f.result()  # surface write errors
    stats["shards_written"] = len(futures)
    if n_shards == 0:
        raise ValueError(f"source {cfg.source.kind} produced no training documents")
    if not val_docs:
        raise ValueError(f"no document fell in the validation split (val_fraction={cfg.val_fraction}); raise it or add text")
    with w.local_tmp(".parquet") as tmp:
        # Small row groups in the val shard, so that up to 8 ranks each get a share of it.
        write_shard(val_docs, tmp, min(cfg.row_group_size, -(-len(val_docs) // 8)))
        w.put_file(tmp, shard_name("val", 0))
    w.write_json("provenance.json", source.provenance())
    secs = time.time() - t0
    chars_per_s = (stats["train_chars"] + stats["val_chars"]) / max(secs, 1e-9)
    ctx.log(f"[data] {n_shards} train shards ({stats['shards_written']} written, {stats['shards_reused']} reused), "
            f"{stats['train_docs']:,} train / {stats['val_docs']:,} val docs, {stats['train_chars']:,} train chars "
            f"in {secs:.1f}s: {chars_per_s / 1e6:.1f} M chars/s")
    return {"train_shards": n_shards, **stats, "chars_per_s": round(chars_per_s)}
