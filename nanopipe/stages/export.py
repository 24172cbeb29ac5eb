"""Stage 11: export — the newest chat model as a Hugging Face transformers directory.

The stage dir is itself the directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the chat template, generation_config.json, README.md), so
`AutoModelForCausalLM.from_pretrained(<store>/export/<key>)` loads it. It is loaded back with
transformers and compared with our model before it is committed (nanopipe/export.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from nanopipe.export import EVAL_STAGES, export_committed

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1


def run(ctx: "StageContext") -> dict:
    cfg = ctx.config
    model = ctx.upstream[cfg.model]
    # Built next to where the store builds its outputs (same filesystem: put_file moves the files).
    with ctx.writer.local_tmp() as anchor, tempfile.TemporaryDirectory(dir=os.path.dirname(anchor)) as tmp:
        out = Path(tmp) / "hf"
        checks = export_committed(ctx.store, model, out, cfg.dtype, [ctx.upstream[s] for s in EVAL_STAGES],
                                  cfg.license, ctx.upstream["tokenizer"])
        files = sorted(out.iterdir())
        size = sum(f.stat().st_size for f in files)
        for f in files:
            ctx.writer.put_file(f, f.name)
    ctx.log(f"[export] {cfg.model}/{model['key'][:16]} -> {ctx.store.url_of(ctx.writer.dir)} ({size:,} bytes); "
            f"transformers logits within {checks['logits_max_abs_diff']:.2e} of ours")
    return {"model": f"{cfg.model}/{model['key'][:16]}", "dtype": cfg.dtype, "bytes": size, **checks}
