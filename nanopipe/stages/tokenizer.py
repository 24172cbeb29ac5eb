"""Stage 2: train the BPE tokenizer (our Rust trainer), write it with token_bytes and a tok-eval table.

The first `heldout_docs` documents of the source are kept out of training and used to measure
compression on unseen text; the rest are streamed to the trainer up to `max_chars` characters.
"""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Iterator

import numpy as np

from nanopipe.data.sources import open_source
from nanopipe.tokenizer import Tokenizer, format_tok_eval, tok_eval

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1


def run(ctx: "StageContext") -> dict:
    cfg = ctx.config
    source = open_source(cfg.source.model_copy(update={"doc_chars": cfg.doc_chars}))
    docs = source.documents()
    heldout = [d for _, d in zip(range(cfg.heldout_docs), docs)]
    seen = {"chars": 0, "docs": 0}

    def training_text() -> Iterator[str]:
        for doc in docs:
            if seen["chars"] >= cfg.max_chars:
                return
            doc = doc[: cfg.max_chars - seen["chars"]]
            seen["chars"] += len(doc)
            seen["docs"] += 1
            if seen["docs"] % 2000 == 0:
                ctx.log(f"[tokenizer] fed {seen['docs']:,} docs, {seen['chars'] / 1e6:.1f} M chars")
            yield doc

    t0 = time.time()
    tok = Tokenizer.train(training_text(), cfg.vocab_size, pattern=cfg.pattern)
    train_s = time.time() - t0
    ctx.log(f"[tokenizer] trained vocab {tok.vocab_size:,} on {seen['chars'] / 1e6:.1f} M chars in {train_s:.1f}s")
    if seen["chars"] == 0:
        raise ValueError(f"source {cfg.source.kind} produced no training text after {cfg.heldout_docs} held-out docs")

    for rel, data in tok.to_files().items():
        ctx.writer.write_bytes(rel, data)
    buf = io.BytesIO()
    np.save(buf, np.asarray(tok.token_bytes(), dtype=np.int32), allow_pickle=False)
    ctx.writer.write_bytes("token_bytes.npy", buf.getvalue())
    rows = tok_eval(tok, heldout)
    table = format_tok_eval(rows)
    ctx.writer.write_bytes("tok_eval.md", table.encode())
    ctx.writer.write_json("tok_eval.json", rows)
    ctx.writer.write_json("provenance.json", source.provenance())
    ctx.log("[tokenizer] compression (bytes/token):\n" + table)
    metrics = {"vocab_size": tok.vocab_size, "train_chars": seen["chars"], "train_docs": seen["docs"],
               "train_seconds": round(train_s, 2), "heldout_docs": len(heldout)}
    heldout_row = next((r for r in rows if r.get("text") == "heldout"), None)
    if heldout_row:
        metrics["heldout_bytes_per_token"] = heldout_row.get("ours_bytes_per_token")
    return metrics
