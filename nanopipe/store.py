"""The artifact store: the one place that decides where stage outputs live.

Layout under one root URL (a local path, ``s3://bucket/prefix`` or any fsspec URL)::

    {root}/{stage}/{key[:16]}/manifest.json    written LAST: a dir without it does not exist
    {root}/{stage}/{key[:16]}/<files>          the stage's outputs, listed with sha256 in the manifest
    {root}/{stage}/{key[:16]}/_work/           in-progress state (checkpoints, partial output)
    {root}/{stage}/{key[:16]}/_work/launch.json    what a torchrun child is to run (runner.launch_child)
    {root}/{stage}/{key[:16]}/_work/progress.json  how far a running torchrun stage is (nanopipe.progress)
    {root}/{stage}/{key[:16]}/launch.log       a torchrun child's full output (not part of the manifest)
    {root}/{stage}/{key[:16]}/_prefect_record.json   Prefect's cache record of the stage (flows/cache.py)
    {root}/_nightly/{UTC time}-{run id}.json   nightly evaluation records (flows/nightly_eval.py)
    {root}/_locks/{stage}/{key[:16]}.lock      held by the process running the stage (runner.stage_lock)
    {root}/_locks/{stage}/{key[:16]}.ranks.lock   held by each rank of its torchrun child

The local cache (``cache_dir()``, $NANOPIPE_CACHE or ~/.cache/nanopipe) is laid out here too::

    {cache}/store/                             the default store
    {cache}/downloads/{kind}/                  downloads kept across runs: pypi/, npm/, encodings/,
                                               and per-mirror folders fineweb-edu/{url hash}/ ...
    {cache}/core/{bundle}/                     CORE eval bundles (downloaded, or built offline)
    {cache}/remote/                            local copies of a remote store's files, by sha256
    {cache}/logs/{stage}/{key[:16]}/launch.log a torchrun child's output, for remote stores
    {cache}/tmp/                               local temp files of outputs bound for a remote store
    {cache}/wandb/                             Weights & Biases run dirs (offline runs stay here to sync)
    {cache}/locks/{store url hash}/{stage}/... the lock files of a remote store's stages (this host's runs)

Keys are content addresses: sha256 of canonical JSON of the stage name, its code version,
its config section and the identities of its upstream outputs (see ``stage_key``).
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import posixpath
import socket
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
from fsspec.core import url_to_fs

MANIFEST = "manifest.json"
WORK = "_work"
LAUNCH_SPEC = "launch.json"
LAUNCH_LOG = "launch.log"
PROGRESS = "progress.json"
PREFECT_RECORD = "_prefect_record.json"
NIGHTLY = "_nightly"
LOCKS = "_locks"
MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


class StoreError(RuntimeError):
    """The store cannot do what was asked (missing stage, unreachable root, ...)."""


class IntegrityError(StoreError):
    """A committed file does not match the sha256 recorded in its manifest, or a manifest is unreadable."""


# Errors of the OS that mean "the store cannot be written": what to tell the user about each.
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some (e.g. `nanopipe gc --yes`) or use another --store, "
                  "then rerun: committed stages and checkpoints are kept",
    errno.EDQUOT: "disk quota exceeded; free some space or use another --store, then rerun",
    errno.EROFS: "the store is on a read-only file system; use a writable --store (or $NANOPIPE_STORE)",
    errno.EACCES: "permission denied; use a store you can write (--store or $NANOPIPE_STORE) or fix its permissions",
    errno.EPERM: "operation not permitted; use a store you can write (--store or $NANOPIPE_STORE)",
}


@contextmanager
def writing(where: str) -> Iterator[None]:
    """Turn a full disk or an unwritable store into a StoreError naming the path and what to do."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        raise StoreError(f"cannot write {where}: {_WRITE_ERRORS[e.errno]} ({e.strerror or e})") from e


def cache_dir() -> Path:
    """User cache dir for nanopipe: downloads, the default store, local copies of remote files."""
    env = os.environ.get("NANOPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanopipe"


def default_root() -> str:
    return os.environ.get("NANOPIPE_STORE") or str(cache_dir() / "store")


def download_cache(kind: str, cache_root: str | os.PathLike | None = None) -> Path:
    """{cache}/downloads/{kind}: downloaded files of one kind (pypi, npm, encodings, ...), kept across runs.

    cache_root replaces cache_dir() (tests, or a caller with its own cache).
    """
    return _cache_root(cache_root) / "downloads" / kind


def mirror_cache(kind: str, base_url: str, cache_root: str | os.PathLike | None = None) -> Path:
    """{cache}/downloads/{kind}/{hash of base_url}: one folder per base URL, so two mirrors of a
    dataset (or a test server) never share files."""
    return download_cache(kind, cache_root) / hashlib.sha256(base_url.encode()).hexdigest()[:16]


def core_bundle_cache(name: str, cache_root: str | os.PathLike | None = None) -> Path:
    """{cache}/core/{name}: an unpacked CORE eval bundle (the published one, or the offline build)."""
    return _cache_root(cache_root) / "core" / name


def wandb_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """{cache}/wandb: where Weights & Biases keeps its run dirs (nanopipe.tracking), outside the
    store's _work/ dirs, which a commit removes: an offline run must outlive its stage to be synced."""
    return _cache_root(cache_root) / "wandb"


def _cache_root(cache_root: str | os.PathLike | None) -> Path:
    return Path(cache_root) if cache_root is not None else cache_dir()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stage_key(stage: str, code_version: str, config: dict, upstream: dict[str, str]) -> str:
    """Content address of a stage run: what it is, what code, what settings, what inputs."""
    payload = {"stage": stage, "code": code_version, "config": config, "upstream": upstream}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def output_digest(manifest: dict) -> str:
    """Identity of a committed stage's outputs, used as the upstream identity by downstream keys.

    It hashes the files' sha256s, not the key: a forced rerun that reproduces the same bytes
    leaves every downstream key unchanged, so downstream stays cached; one that changes
    its outputs changes downstream keys, so downstream reruns.
    """
    files = sorted((f["path"], f["sha256"]) for f in manifest["files"])
    return hashlib.sha256(canonical_json([manifest["stage"], files]).encode()).hexdigest()


def sha256_file(fs, path: str, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of a file; on_bytes(n) is told of every chunk read (progress)."""
    h, n = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest(), n


def _problem(entry: dict, digest: str, size: int) -> str | None:
    """What is wrong with a file whose content hashed to (digest, size), given its manifest entry; None if intact."""
    if size != entry["bytes"]:
        return f"wrong size (manifest {entry['bytes']:,} B, found {size:,} B)"
    if digest != entry["sha256"]:
        return f"sha256 mismatch (manifest {entry['sha256'][:12]}…, found {digest[:12]}…)"
    return None


_MANIFEST_FIELDS = {"stage": str, "key": str, "files": list, "upstream": dict, "metrics": dict, "timings": dict,
                    "created_at": str}
_FILE_FIELDS = {"path": str, "bytes": int, "sha256": str}


def parse_manifest(data: bytes) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, what is wrong) for bytes that are not a stage manifest."""
    try:
        m = json.loads(data)
    except ValueError as e:  # not JSON (truncated, overwritten), or not even text
        return None, f"manifest is not valid JSON ({e})"
    if not isinstance(m, dict):
        return None, f"manifest is a JSON {type(m).__name__}, not an object"
    for name, kind in _MANIFEST_FIELDS.items():
        if not isinstance(m.get(name), kind):
            return None, f"manifest field {name!r} is missing or not a {kind.__name__}"
    for f in m["files"]:
        if not isinstance(f, dict) or not all(isinstance(f.get(k), t) for k, t in _FILE_FIELDS.items()):
            return None, f"manifest has a malformed files entry: {json.dumps(f)[:80]}"
    return m, None


# Committed files this process has hashed: local path -> (sha256, size, mtime_ns) they matched.
# A large file (a shard, a checkpoint) is verified once per process, not on every read.
_verified: dict[str, tuple[str, int, int]] = {}
_verify_locks: dict[str, threading.Lock] = {}
_verify_locks_guard = threading.Lock()


class Store:
    def __init__(self, url: str | None = None):
        self.url = (url or default_root()).rstrip("/")
        self.fs, root = url_to_fs(self.url)
        self.root = root.rstrip("/") or "/"
        self.is_local = "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ----- paths (the only code that decides them) -----
    def stage_dir(self, stage: str, key: str) -> str:
        return posixpath.join(self.root, _stage_rel(stage, key))

    def work_dir(self, stage: str, key: str) -> str:
        return posixpath.join(self.stage_dir(stage, key), WORK)

    def launch_spec_path(self, stage: str, key: str) -> str:
        """What a torchrun child of (stage, key) is to run: written by the parent, read by every rank."""
        return posixpath.join(self.work_dir(stage, key), LAUNCH_SPEC)

    def progress_path(self, stage: str, key: str) -> str:
        """How far a running torchrun stage is (nanopipe.progress): rank 0 rewrites it atomically while
        it runs; it goes with the rest of _work/ when the stage commits."""
        return posixpath.join(self.work_dir(stage, key), PROGRESS)

    def launch_log_path(self, stage: str, key: str) -> str:
        """A torchrun child's full output, kept beside the stage's outputs (not part of the manifest)."""
        return posixpath.join(self.stage_dir(stage, key), LAUNCH_LOG)

    def local_launch_log(self, stage: str, key: str) -> str:
        """The local file a launch tees the child's output into: launch_log_path itself on a local
        store; a copy in the cache for a remote one (uploaded to launch_log_path afterwards)."""
        if self.is_local:
            return self.launch_log_path(stage, key)
        return str(cache_dir() / "logs" / stage / key[:16] / LAUNCH_LOG)

    def lock_path(self, stage: str, key: str) -> str:
        """The local file the process running (stage, key) holds locked (flock) while it runs.

        Beside the stage dir, not inside it: a commit removes _work/ and --force the whole dir, and a
        lock file removed while held keeps no one out. flock needs a local file: a remote store's
        lock files live in the cache, keyed by the store URL, so they order the runs of one host."""
        return posixpath.join(self._locks_root(), stage, f"{key[:16]}.lock")

    def rank_lock_path(self, stage: str, key: str) -> str:
        """The local file every rank of a torchrun child of (stage, key) holds (shared) while it works."""
        return posixpath.join(self._locks_root(), stage, f"{key[:16]}.ranks.lock")

    def _locks_root(self) -> str:
        if self.is_local:
            return posixpath.join(self.root, LOCKS)
        return str(cache_dir() / "locks" / hashlib.sha256(self.url.encode()).hexdigest()[:16])

    def prefect_record(self, stage: str, key: str) -> str:
        """Prefect's cache record of (stage, key), relative to the root: Prefect's result storage is
        rooted at the store, so this is also the Prefect cache key. It lives in the stage dir, so
        removing the stage removes its record too."""
        return posixpath.join(_stage_rel(stage, key), PREFECT_RECORD)

    def prefect_record_path(self, stage: str, key: str) -> str:
        return posixpath.join(self.root, self.prefect_record(stage, key))

    def nightly_dir(self) -> str:
        """Records of nightly evaluation runs (one JSON per run), for regression comparison."""
        return posixpath.join(self.root, NIGHTLY)

    def nightly_record_path(self, created: _dt.datetime, run_id: str) -> str:
        """{nightly dir}/{UTC time}-{run id[:8]}.json: records are named by time, so names sort by age."""
        stamp = created.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        return posixpath.join(self.nightly_dir(), f"{stamp}-{run_id[:8]}.json")

    def nightly_records(self) -> list[str]:
        """Paths of the nightly records in the store, oldest first."""
        try:
            return sorted(p for p in self.fs.ls(self.nightly_dir(), detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []

    def url_of(self, path: str) -> str:
        """Full URL (with protocol) of a path inside this store, for links and other processes."""
        if self.is_local:
            return path
        return self.fs.unstrip_protocol(path)

    def ensure_local_dir(self, path: str) -> None:
        if self.is_local:
            os.makedirs(path, exist_ok=True)

    # ----- reading -----
    def _read_manifest(self, stage_dir: str) -> tuple[dict | None, str | None]:
        """(manifest, None); (None, None) if the dir holds no manifest; (None, problem) if it is damaged."""
        try:
            data = self.fs.cat_file(posixpath.join(stage_dir, MANIFEST))
        except FileNotFoundError:
            return None, None
        return parse_manifest(data)

    def _damaged(self, stage_dir: str, problem: str) -> IntegrityError:
        stage = posixpath.basename(posixpath.dirname(stage_dir))
        return IntegrityError(f"{self.url_of(posixpath.join(stage_dir, MANIFEST))}: {problem}; "
                              f"rebuild it with `--force {stage}` or remove {self.url_of(stage_dir)}")

    def manifest(self, stage: str, key: str) -> dict | None:
        """The committed manifest of (stage, key), or None if it was never committed."""
        path = posixpath.join(self.stage_dir(stage, key), MANIFEST)
        m, problem = self._read_manifest(self.stage_dir(stage, key))
        if problem:
            raise self._damaged(self.stage_dir(stage, key), problem)
        if m is None:
            return None
        if m.get("key") != key or m.get("stage") != stage:
            raise IntegrityError(f"{self.url_of(path)}: manifest belongs to {m.get('stage')}/{m.get('key')}, not {stage}/{key}")
        return m

    def _file_entry(self, manifest: dict, rel: str) -> dict:
        for f in manifest["files"]:
            if f["path"] == rel:
                return f
        known = ", ".join(f["path"] for f in manifest["files"][:10])
        raise StoreError(f"{manifest['stage']}/{manifest['key'][:16]} has no file {rel!r} (has: {known})")

    def path_of(self, manifest: dict, rel: str) -> str:
        self._file_entry(manifest, rel)
        return posixpath.join(self.stage_dir(manifest["stage"], manifest["key"]), rel)

    def _check(self, manifest: dict, rel: str, digest: str, size: int) -> None:
        problem = _problem(self._file_entry(manifest, rel), digest, size)
        if problem:
            raise IntegrityError(f"{self.url_of(self.path_of(manifest, rel))}: {problem}; "
                                 "the file was changed or corrupted after it was committed")

    def read_bytes(self, manifest: dict, rel: str) -> bytes:
        """Read a committed file, verifying its sha256 against the manifest."""
        path = self.path_of(manifest, rel)
        data = self.fs.cat_file(path)
        self._check(manifest, rel, hashlib.sha256(data).hexdigest(), len(data))
        return data

    def local_path(self, manifest: dict, rel: str, verify: bool = True) -> str:
        """A verified local file path for a committed file (downloaded to the cache for remote stores).

        The file is hashed the first time this process asks for it (and again if it changes on
        disk), so callers may ask for it on every read."""
        entry = self._file_entry(manifest, rel)
        path = self.path_of(manifest, rel)
        if self.is_local:
            local = path
        else:
            local = str(cache_dir() / "remote" / entry["sha256"][:2] / f"{entry['sha256']}{Path(rel).suffix}")
            if not os.path.exists(local):
                with writing(local):
                    os.makedirs(os.path.dirname(local), exist_ok=True)
                    tmp = f"{local}.{uuid.uuid4().hex}.tmp"
                    self.fs.get_file(path, tmp)
                    os.replace(tmp, local)
        if verify:
            st = os.stat(local)
            stamp = (entry["sha256"], st.st_size, st.st_mtime_ns)
            with _verify_locks_guard:
                lock = _verify_locks.setdefault(local, threading.Lock())
            with lock:  # threads reading one shard wait for one hash, not one each
                if _verified.get(local) != stamp:
                    digest, size = sha256_file(fsspec.filesystem("file"), local)
                    self._check(manifest, rel, digest, size)
                    _verified[local] = stamp
        return local

    def file_problem(self, manifest: dict, entry: dict, on_bytes: Callable[[int], None] | None = None) -> str | None:
        """Hash one committed file (every byte, no memo): "missing", "wrong size …", "sha256 mismatch …" or None."""
        try:
            digest, size = sha256_file(self.fs, self.path_of(manifest, entry["path"]), on_bytes)
        except FileNotFoundError:
            return "missing"
        return _problem(entry, digest, size)

    def verify(self, manifest: dict) -> list[str]:
        """Check every file of a manifest; returns the problems found (empty when intact)."""
        problems = []
        for f in manifest["files"]:
            problem = self.file_problem(manifest, f)
            if problem:
                problems.append(f"{self.url_of(self.path_of(manifest, f['path']))}: {problem}")
        return problems

    # ----- listing -----
    def stages(self) -> list[str]:
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                      if e["type"] == "directory" and not posixpath.basename(e["name"].rstrip("/")).startswith("_"))

    def stage_dirs(self, stage: str) -> list[str]:
        try:
            entries = self.fs.ls(posixpath.join(self.root, stage), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/") for e in entries if e["type"] == "directory")

    def manifests(self, stage: str | None = None, bad: list[tuple[str, str]] | None = None) -> list[dict]:
        """All committed manifests (of one stage or all), oldest first.

        A damaged manifest raises IntegrityError naming it; given a `bad` list, it is appended
        there as (manifest path, problem) and skipped instead."""
        out = []
        for s in [stage] if stage else self.stages():
            for d in self.stage_dirs(s):
                m, problem = self._read_manifest(d)
                if problem and bad is None:
                    raise self._damaged(d, problem)
                if problem:
                    bad.append((posixpath.join(d, MANIFEST), problem))
                elif m is not None:
                    out.append(m)
        return sorted(out, key=lambda m: m["created_at"])

    def find(self, key_prefix: str) -> dict:
        """The manifest whose key starts with key_prefix (at least 6 hex chars)."""
        if len(key_prefix) < 6:
            raise StoreError("give at least 6 characters of a key")
        bad: list[tuple[str, str]] = []
        hits = [m for m in self.manifests(bad=bad) if m["key"].startswith(key_prefix)]
        damaged = [p for p, _ in bad if posixpath.basename(posixpath.dirname(p)).startswith(key_prefix[:16])]
        if damaged:
            raise self._damaged(posixpath.dirname(damaged[0]), dict(bad)[damaged[0]])
        if not hits:
            raise StoreError(f"no committed stage with key {key_prefix!r} in {self.url}")
        if len(hits) > 1:
            raise StoreError(f"key prefix {key_prefix!r} is ambiguous: " + ", ".join(f"{m['stage']}/{m['key'][:16]}" for m in hits))
        return hits[0]

    def unfinished(self) -> list[tuple[str, str, float]]:
        """(stage, dir, age in seconds) of stage dirs that hold no manifest."""
        out = []
        for s in self.stages():
            for d in self.stage_dirs(s):
                if not self.fs.exists(posixpath.join(d, MANIFEST)):
                    out.append((s, d, self._age(d)))
        return out

    def _age(self, d: str) -> float:
        newest = 0.0
        for info in self.fs.find(d, detail=True, withdirs=False).values():
            mt = info.get("mtime") or info.get("LastModified") or info.get("created")
            if isinstance(mt, _dt.datetime):
                mt = mt.timestamp()
            newest = max(newest, float(mt or 0))
        return time.time() - newest if newest else float("inf")

    # ----- writing -----
    def writer(self, stage: str, key: str) -> "StageWriter":
        return StageWriter(self, stage, key)

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            with writing(self.url_of(path)):
                self.fs.rm(path, recursive=True)

    def atomic_put(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see all of it or nothing: on a local disk a temp
        name, fsync, then rename; on object stores one PUT (atomic there)."""
        with writing(self.url_of(path)):
            if not self.is_local:
                self.fs.pipe_file(path, data)
                return
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with suppress(OSError):
                    os.remove(tmp)
                raise

    def check_writable(self) -> float:
        """Round-trip a small object through the store; returns the seconds it took."""
        t0 = time.time()
        probe = posixpath.join(self.root, "_probe", f"{socket.gethostname()}-{uuid.uuid4().hex}")
        with writing(self.url_of(probe)):
            self.fs.makedirs(posixpath.dirname(probe), exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            ok = self.fs.cat_file(probe) == b"ok"
            self.fs.rm(probe)
        if not ok:
            raise StoreError(f"{self.url}: wrote a probe object but read back something else")
        return time.time() - t0


class StageWriter:
    """Writes one stage's outputs and commits them with a manifest, last and atomically."""

    def __init__(self, store: Store, stage: str, key: str):
        self.store, self.stage, self.key = store, stage, key
        self.dir = store.stage_dir(stage, key)
        self.work = store.work_dir(stage, key)
        self.files: dict[str, dict] = {}
        with writing(store.url_of(self.dir)):
            store.fs.makedirs(self.dir, exist_ok=True)

    def path(self, rel: str) -> str:
        _check_rel(rel)
        return posixpath.join(self.dir, rel)

    def work_path(self, rel: str) -> str:
        return posixpath.join(self.work, rel)

    def _record(self, rel: str, digest: str, size: int) -> None:
        self.files[rel] = {"path": rel, "bytes": size, "sha256": digest}

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        with writing(self.store.url_of(path)):
            self.store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.store.atomic_put(path, data)
        self._record(rel, hashlib.sha256(data).hexdigest(), len(data))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def put_file(self, local: str | os.PathLike, rel: str) -> None:
        """Upload (or, on a local store, move into place) a finished local file."""
        path = self.path(rel)
        digest, size = sha256_file(fsspec.filesystem("file"), str(local))
        with writing(self.store.url_of(path)):
            self.store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            if self.store.is_local:
                os.replace(local, path)
            else:
                self.store.fs.put_file(str(local), path)
        self._record(rel, digest, size)

    def adopt(self, rel: str) -> None:
        """Record a file that is already in place (e.g. written by an earlier, interrupted attempt)."""
        digest, size = sha256_file(self.store.fs, self.path(rel))
        self._record(rel, digest, size)

    def exists(self, rel: str) -> bool:
        return self.store.fs.exists(self.path(rel))

    @contextmanager
    def local_tmp(self, suffix: str = "") -> Iterator[str]:
        """A local temp file path to build an output in before put_file (removed if unused)."""
        base = self.work if self.store.is_local else str(cache_dir() / "tmp")
        with writing(base):
            os.makedirs(base, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=suffix, dir=base)
        os.close(fd)
        try:
            with writing(tmp):  # the caller fills it (e.g. pyarrow): a full disk shows up here
                yield tmp
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def commit(self, *, config: dict, upstream: dict[str, dict], code_version: str,
               metrics: dict, started_at: float, extra: dict | None = None) -> dict:
        """Write manifest.json last (temp name then rename on local disks; S3 PUTs are atomic)."""
        from nanopipe import __version__

        finished = time.time()
        manifest = {
            "format": MANIFEST_FORMAT,
            "stage": self.stage,
            "key": self.key,
            "config": config,
            "upstream": {name: {"key": m["key"], "digest": output_digest(m)} for name, m in upstream.items()},
            "code_version": code_version,
            "files": sorted(self.files.values(), key=lambda f: f["path"]),
            "metrics": metrics,
            "timings": {"started_at": _iso(started_at), "finished_at": _iso(finished),
                        "seconds": round(finished - started_at, 3)},
            "host": {"hostname": socket.gethostname(), "pid": os.getpid()},
            "versions": _versions(__version__),
            "created_at": _iso(finished),
            **(extra or {}),
        }
        self.store.atomic_put(posixpath.join(self.dir, MANIFEST),
                              (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        self.store.remove(self.work)
        return manifest


def _stage_rel(stage: str, key: str) -> str:
    return posixpath.join(stage, key[:16])


def _check_rel(rel: str) -> None:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ".." in parts or parts[0] in (WORK, MANIFEST):
        raise StoreError(f"invalid output path {rel!r}: must be relative, inside the stage dir, not {WORK}/ or {MANIFEST}")


def _protocols(fs) -> tuple:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _versions(nanopipe_version: str) -> dict:
    import platform
    import sys

    out = {"nanopipe": nanopipe_version, "python": sys.version.split()[0], "platform": platform.platform()}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        pass
    return out
