"""Tokenizing, rank-sharded, exactly resumable data loader over parquet shards.

Input: parquet shards with a `text` column (the data stage writes row groups of
1,024 documents), given as local paths or fsspec URLs, or as names that a `resolve`
function turns into paths each time a shard is opened (the stages pass the store's
verified read, so a shard is checked against its manifest before its first use).

Sharding: the row groups of all shards, in order, form one global sequence;
rank r of W takes row groups r, r+W, r+2W, ... so ranks see disjoint data. When
a rank runs out it starts the next epoch from the beginning (epoch counter).

Packing (nanochat's classic "simple packing"): every document is tokenized with
BOS prepended and the documents of this rank's row groups are concatenated into
one token stream. Batch k is the window stream[k*B*T : k*B*T + B*T + 1]:
inputs = window[:-1].view(B, T), targets = window[1:].view(B, T). Every token is
a target exactly once, nothing is cropped, and a document that does not fit
continues in the next row (the BOS tokens tell the model where documents start).

Position: because the stream is a pure function of (shards, rank, world size,
tokenizer), the start of the next batch is fully described by
(epoch, shard, row_group, offset into that row group's tokens). Resuming
re-reads that row group, re-tokenizes it and skips `offset` tokens, so a resumed
run yields exactly the batches an uninterrupted run would have. The position
does not depend on B or T, so those may change across a resume.

Tokenization runs in a small thread pool that works a few row groups ahead of
the consumer (tiktoken releases the GIL), so training never waits on it.
"""

import itertools
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

TEXT_COLUMN = "text"
STATE_KEYS = ("epoch", "shard", "row_group", "offset", "rank", "world_size")

Position = tuple[int, int, int]  # (epoch, shard index, row group index within the shard)


def _read_and_tokenize(path: str, row_group: int, tokenizer) -> np.ndarray:
    """One row group -> the concatenated token ids of its documents, each starting with BOS."""
    # A fresh file handle per task: file objects are not safe to share across threads.
    with fsspec.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(row_group, columns=[TEXT_COLUMN])
    column = table.column(TEXT_COLUMN)
    if column.null_count:
        raise ValueError(f"{path}: row group {row_group} has {column.null_count} null `{TEXT_COLUMN}` values")
    docs = tokenizer.encode(column.to_pylist(), prepend=tokenizer.bos_id)
    total = sum(len(doc) for doc in docs)
    return np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32, count=total)


class _RowGroupWalker:
    """Walks this rank's row groups (global stride world_size) across shards and epochs."""

    def __init__(self, files: list[str], rank: int, world_size: int, resolve: Callable[[str], str]):
        self.files = files
        self.rank = rank
        self.world_size = world_size
        self.resolve = resolve
        self._counts: dict[int, int] = {}  # shard -> number of row groups, read lazily

    def num_row_groups(self, shard: int) -> int:
        if shard not in self._counts:
            path = self.resolve(self.files[shard])
            with fsspec.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                count = pf.metadata.num_row_groups
            if TEXT_COLUMN not in schema.names:
                raise ValueError(f"{path}: parquet file has no `{TEXT_COLUMN}` column (columns: {schema.names})")
            kind = schema.field(TEXT_COLUMN).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                raise ValueError(f"{path}: column `{TEXT_COLUMN}` must hold strings, found {kind}")
            self._counts[shard] = count
        return self._counts[shard]

    def normalize(self, epoch: int, shard: int, row_group: int) -> Position:
        """Carry a row-group index past the end of its shard into the following shards/epochs."""
        wraps = 0
        while True:
            while shard < len(self.files) and row_group >= self.num_row_groups(shard):
                row_group -= self.num_row_groups(shard)
                shard += 1
            if shard < len(self.files):
                return epoch, shard, row_group
            wraps += 1
            if wraps == 2:  # a whole epoch went by without a row group for this rank
                total = sum(self.num_row_groups(s) for s in range(len(self.files)))
                raise ValueError(
                    f"rank {self.rank} of {self.world_size} gets no data: the {len(self.files)} shard(s) "
                    f"hold {total} row group(s) in all; use fewer ranks or more row groups"
                )
            epoch, shard, row_group = epoch + 1, 0, self.rank

    def first(self, epoch: int = 0) -> Position:
        return self.normalize(epoch, 0, self.rank)

    def next(self, pos: Position) -> Position:
        epoch, shard, row_group = pos
        return self.normalize(epoch, shard, row_group + self.world_size)


class DataLoader:
    """Infinite iterator of (inputs, targets) torch.long tensors of shape (B, T) on `device`.

    files: parquet shard paths or fsspec URLs, read in this order.
    resolve: name in `files` -> the path to open, called whenever a shard is opened (default: as is).
    tokenizer: anything with `encode(list[str], prepend=bos_id) -> list[list[int]]` and `bos_id`.
    resume_state: a dict from `state_dict()`; the first batch is then the one that
        would have come next in the run that saved it.
    max_epochs: stop (StopIteration) after this many passes; None cycles forever.
        The last, partial batch of the final pass is dropped.
    threads, prefetch: tokenizer threads and how many row groups to work ahead.
    """

    def __init__(self, files, tokenizer, B: int, T: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", resume_state: dict | None = None,
                 max_epochs: int | None = None, threads: int = 2, prefetch: int = 4,
                 resolve: Callable[[str], str] = str):
        files = [str(f) for f in files]
        if not files:
            raise ValueError("DataLoader needs at least one shard file, got an empty list")
        for name, value in (("B", B), ("T", T), ("world_size", world_size), ("threads", threads), ("prefetch", prefetch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DataLoader: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"DataLoader: rank must be in [0, {world_size}), got {rank!r}")
        if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < 1):
            raise ValueError(f"DataLoader: max_epochs must be None or an integer >= 1, got {max_epochs!r}")
        if not callable(getattr(tokenizer, "encode", None)) or not isinstance(getattr(tokenizer, "bos_id", None), int):
            raise TypeError("DataLoader: tokenizer must have an encode(list[str], prepend=...) method and an int bos_id")
        self.files, self.tokenizer = files, tokenizer
        self.B, self.T = B, T
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.max_epochs = max_epochs
        self.prefetch = prefetch
        self._walker = _RowGroupWalker(files, rank, world_size, resolve)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nanopipe-tokenize")
        self._pending: deque[tuple[Position, Future]] = deque()  # submitted row groups, in stream order
        self._chunks: deque[tuple[Position, np.ndarray]] = deque()  # tokenized row groups not yet consumed
        self.load_state_dict(resume_state)

    # ---- position -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the NEXT batch starts, as JSON-able ints."""
        epoch, shard, row_group = self._head
        return {"epoch": epoch, "shard": shard, "row_group": row_group, "offset": self._offset,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict | None) -> None:
        """Move to `state` (None: the very beginning), dropping any prefetched work."""
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._chunks.clear()
        if state is None:
            self._head, self._offset = self._walker.first(), 0
        else:
            self._head, self._offset = self._check_state(state), state["offset"]
        self._next_submit = self._head
        self._first_chunk_checked = False

    def _check_state(self, state: dict) -> Position:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state is missing {missing}; expected keys {list(STATE_KEYS)}")
        bad = [k for k in STATE_KEYS if not isinstance(state[k], int) or state[k] < 0]
        if bad:
            raise ValueError(f"loader state fields {bad} must be non-negative integers: {state}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"loader state was saved by rank {state['rank']} of {state['world_size']}, "
                f"cannot resume it as rank {self.rank} of {self.world_size}"
            )
        if state["shard"] >= len(self.files):
            raise ValueError(f"loader state points at shard {state['shard']}, but only {len(self.files)} shard(s) given")
        if state["row_group"] >= self._walker.num_row_groups(state["shard"]):
            raise ValueError(
                f"loader state points at row group {state['row_group']} of {self.files[state['shard']]}, "
                f"which has {self._walker.num_row_groups(state['shard'])}"
            )
        return state["epoch"], state["shard"], state["row_group"]

    # ---- background tokenization ------------------------------------------------------------

    def _exhausted(self, pos: Position) -> bool:
        return self.max_epochs is not None and pos[0] >= self.max_epochs

    def _fill(self) -> None:
        while len(self._pending) < self.prefetch and not self._exhausted(self._next_submit):
            pos = self._next_submit
            future = self._pool.submit(_read_and_tokenize, self._walker.resolve(self.files[pos[1]]), pos[2],
                                       self.tokenizer)
            self._pending.append((pos, future))
            self._next_submit = self._walker.next(pos)

    def _receive(self) -> bool:
        """Append the next tokenized row group to the chunks; False when the data is exhausted."""
        self._fill()
        if not self._pending:
            return False
        pos, future = self._pending.popleft()
        tokens = future.result()
        self._fill()
        if not self._first_chunk_checked:
            self._first_chunk_checked = True
            if self._offset > len(tokens):
                raise ValueError(
                    f"loader state offset {self._offset} is past the end of row group {pos[2]} of "
                    f"{self.files[pos[1]]} ({len(tokens)} tokens): the data or tokenizer changed since it was saved"
                )
        self._chunks.append((pos, tokens))
        return True

    # ---- batches ----------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        need = B * T + 1  # the window's last token is the next batch's first input
        pieces, have, i, start = [], 0, 0, self._offset
        while have < need:
            if i == len(self._chunks) and not self._receive():
                raise StopIteration
            piece = self._chunks[i][1][start:start + need - have]
            pieces.append(piece)
            have += len(piece)
            i, start = i + 1, 0
        # Advance by B*T; at least one known token lies beyond, so the head stays inside the chunks.
        self._offset += B * T
        while self._offset >= len(self._chunks[0][1]):
            self._offset -= len(self._chunks[0][1])
            self._chunks.popleft()
        self._head = self._chunks[0][0]

        window = torch.from_numpy(np.concatenate(pieces)).long()
        if self.device.type == "cuda":
            window = window.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            window = window.to(self.device)
        return window[:-1].view(B, T), window[1:].view(B, T)

    # ---- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def sample_chars_per_token(files, tokenizer, resolve: Callable[[str], str] = str, shards: int = 8,
                           docs: int = 128) -> tuple[int, int]:
    """(chars, tokens) of the first `docs` documents of `shards` shards spread evenly over `files`,
    tokenized as the loader does but without BOS: their ratio estimates the chars/token of the whole."""
    files = [str(f) for f in files]
    picks = sorted({round(i * (len(files) - 1) / max(shards - 1, 1)) for i in range(min(shards, len(files)))})
    chars = tokens = 0
    for k in picks:
        with fsspec.open(resolve(files[k]), "rb") as f:
            pf = pq.ParquetFile(f)
            texts = pf.read_row_group(0, columns=[TEXT_COLUMN]).column(TEXT_COLUMN).to_pylist()[:docs] \
                if pf.metadata.num_row_groups else []
        chars += sum(len(t) for t in texts)
        tokens += sum(len(ids) for ids in tokenizer.encode(texts))
    return chars, tokens


def val_batches(files, tokenizer, B: int, T: int, rank: int = 0, world_size: int = 1,
                max_batches: int | None = None, device: str | torch.device = "cpu", resolve: Callable[[str], str] = str):
    """Deterministic validation batches, packed like training batches.

    max_batches=None: one pass over this rank's share of the data (partial last batch dropped).
    max_batches=N: exactly N batches, wrapping around to the start if the data runs out, as
    nanochat does, so every rank runs the same number of steps (needed for collective ops).
    """
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 0):
        raise ValueError(f"val_batches: max_batches must be None or an integer >= 0, got {max_batches!r}")
    # Built here, not inside the generator, so bad arguments fail at the call.
    loader = DataLoader(files, tokenizer, B, T, rank=rank, world_size=world_size, device=device,
                        max_epochs=1 if max_batches is None else None, resolve=resolve)
    return _take(loader, max_batches)


def _take(loader: DataLoader, n: int | None):
    with loader:
        yield from itertools.islice(loader, n)
