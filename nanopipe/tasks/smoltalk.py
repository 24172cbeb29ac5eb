"""SmolTalk (HuggingFaceTB/smol-smoltalk, Apache-2.0): nanochat's general SFT/mid-training chat.

Online only: the parquet files come from the Hugging Face hub over https (or any fsspec URL
given as base_url, e.g. a local mirror), downloaded in parallel with retries through
nanopipe.data.sources, and cached under store.mirror_cache("smol-smoltalk", base_url).
train is 4 files (~460K conversations), test 1 file (~24K).

The `messages` column is copied once into an uncompressed Arrow IPC file next to the parquet
files and memory-mapped, so random access (a shuffled mixture) costs neither RAM nor a
decompression per example.
"""

import os
import random
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

from nanopipe.chat import ChatFormatError, normalize_messages
from nanopipe.data.sources import download_files
from nanopipe.store import mirror_cache
from nanopipe.tasks.base import SHUFFLE_SEED, Task

SMOLTALK_URL = "https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main"
FILES = {
    "train": [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)],
    "test": ["data/test-00000-of-00001.parquet"],
}
LICENSE = "Apache-2.0"


def fetch(split: str, base_url: str = SMOLTALK_URL, cache_dir: str | Path | None = None) -> list[dict]:
    """Download the split's parquet files (those not cached yet); [{url, path, bytes, sha256}]."""
    if split not in FILES:
        raise ValueError(f"SmolTalk split must be one of {list(FILES)}, got {split!r}")
    base = base_url.rstrip("/")
    return download_files([f"{base}/{name}" for name in FILES[split]], mirror_cache("smol-smoltalk", base, cache_dir),
                          f"smol-smoltalk {split}")


def _messages_arrow(files: list[dict], target: Path) -> Path:
    """Copy the `messages` column of the parquet files into one Arrow IPC file (once)."""
    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    writer = schema = None
    try:
        for f in files:
            pf = pq.ParquetFile(f["path"])
            if "messages" not in pf.schema_arrow.names:
                raise ValueError(f"{f['url']}: no 'messages' column (columns: {pf.schema_arrow.names})")
            for rg in range(pf.num_row_groups):  # a row group at a time keeps memory flat
                column = pf.read_row_group(rg, columns=["messages"]).column("messages")
                if schema is None:
                    schema = pa.schema([("messages", column.type)])
                    writer = pa.ipc.new_file(str(tmp), schema)
                elif column.type != schema.field("messages").type:
                    raise ValueError(f"{f['url']}: 'messages' has type {column.type}, "
                                     f"the first file has {schema.field('messages').type}")
                writer.write_table(pa.Table.from_arrays([column], schema=schema))
        if writer is None:
            raise ValueError(f"{[f['url'] for f in files]}: no rows")
        writer.close()
        writer = None
        os.replace(tmp, target)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return target


class SmolTalk(Task):
    """smol-smoltalk conversations (optional system message, then user/assistant turns)."""

    def __init__(self, split: str = "train", base_url: str = SMOLTALK_URL, cache_dir: str | Path | None = None,
                 **view):
        super().__init__(**view)
        self.split = split
        self.files = fetch(split, base_url, cache_dir)
        arrow = _messages_arrow(self.files, Path(self.files[0]["path"]).with_name(f"{split}.messages.arrow"))
        self.messages = pa.ipc.open_file(pa.memory_map(str(arrow))).read_all().column("messages")
        # a fixed permutation instead of shuffling the data: prefix views are fair samples
        self.order = list(range(len(self.messages)))
        random.Random(SHUFFLE_SEED).shuffle(self.order)

    def num_examples(self) -> int:
        return len(self.order)

    def get_example(self, index: int) -> dict:
        row = self.order[index]
        messages = self.messages[row].as_py()
        conversation = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages or []]}
        try:
            normalize_messages(conversation)
        except ChatFormatError as e:
            raise ChatFormatError(f"SmolTalk {self.split} row {row}: {e}") from None
        return conversation

    def provenance(self) -> dict:
        return {**super().provenance(), "split": self.split, "license": LICENSE, "files": self.files}
