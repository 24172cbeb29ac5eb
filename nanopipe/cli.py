"""`nanopipe` command line.

    nanopipe run [--preset tiny] [--set section.field=value ...] [--stages a,b] [--force STAGE] [--store URL]
    nanopipe stage NAME ...            one stage (and what it needs) directly, without Prefect
    nanopipe status [--json]           each stage of a config: built, running (with its progress), or why not
    nanopipe plan [--gpus N] [--gpu G] what a config will take before it runs: memory per GPU, batch, steps, time, cost
    nanopipe artifacts ls|show NAME    browse the store: manifests, lineage, files (NAME: stage, key or artifact key)
    nanopipe gc [--yes]                remove unfinished and unreferenced stage dirs (dry run by default), say what stays
    nanopipe verify [STAGE ...]        check every committed file of the store against its manifest
    nanopipe report                    print the committed report of a config
    nanopipe chat [-p PROMPT]          talk to a model from the store in the terminal
    nanopipe serve [--port 8000]       web chat UI + OpenAI-compatible API for a model from the store
    nanopipe export --out DIR          a model from the store as a Hugging Face transformers directory
    nanopipe push --repo NAME          upload an export to the Hugging Face hub
    nanopipe ui                        local Prefect server, work pools, workers and deployments

Bad configs, unknown stage names and damaged manifests print one line and exit with status 2,
before any work; a store that cannot be written while `run`/`stage` work (full disk, read-only) is
one line and status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

from nanopipe import gpus
from nanopipe.artifacts import NIGHTLY_KEYS, stage_of
from nanopipe.config import ConfigError, load_config
from nanopipe.dag import PlanError, check_names, plan_stages
from nanopipe.launch import LaunchError
from nanopipe.progress import fmt_eta
from nanopipe.stages import STAGES
from nanopipe.store import Store, StoreError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny | cpu | d20 | d26 | d32 (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value (repeatable), e.g. --set base_train.depth=6")
    p.add_argument("--store", default=None, help="store root URL (default $NANOPIPE_STORE or ~/.cache/nanopipe/store)")


def _split(values: list[str]) -> list[str]:
    return [s for v in values for s in v.split(",") if s]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nanopipe", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run the pipeline (Prefect flow; cached stages are reused)")
    _common(p)
    p.add_argument("--stages", action="append", default=[], help="comma-separated stages (default: all)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="rebuild STAGE even if built")
    p.add_argument("--no-prefect", action="store_true", help="run the stages directly, without Prefect")

    p = sub.add_parser("stage", help="run one stage (and its missing upstream) directly, without Prefect")
    p.add_argument("name")
    _common(p)
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("status", help="what is built for a config, what runs now, and why the rest will (re)run")
    _common(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("plan", help="memory per GPU, batch, steps, tokens, data passes, store space, time and "
                                     "cost of a config, before running anything")
    p.add_argument("--preset", default="tiny", help="tiny | cpu | d20 | d26 | d32 (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value (repeatable), e.g. --set base_train.device_batch_size=auto")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per torchrun stage (default: each stage's nproc_per_node)")
    p.add_argument("--gpu", default="h100-80gb", help="GPU kind: " + ", ".join(gpus.GPUS))
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate (default 0.4)")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="USD (default: a rough price for --gpu)")
    p.add_argument("--mid-tokens", type=int, default=None, help="tokens of mid_train's mixture, to time one epoch")
    p.add_argument("--sft-conversations", type=int, default=None, help="conversations of sft's mixture, to time one epoch")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("artifacts", help="browse the store: manifests, files, lineage",
                       description="Browse the store's committed stage outputs: the same things, under the same "
                                   "keys, as the Artifacts page of the Prefect UI.")
    asub = p.add_subparsers(dest="acmd", required=True, metavar="{ls,show}")
    q = asub.add_parser("ls", help="list every committed stage output (damaged manifests flagged)")
    q.add_argument("--stage", help="only this stage")
    q.add_argument("--store")
    q = asub.add_parser("show", help="one stage output: manifest, files, lineage")
    q.add_argument("name", metavar="NAME",
                   help="a stage name (its build for --preset/--set), a store-key prefix (6+ hex chars, or "
                        "stage/key), or a Prefect artifact key such as data-summary, base-train-metrics or "
                        "nightly-eval-table")
    _common(q)

    p = sub.add_parser("gc", help="remove unfinished and unreferenced stage dirs")
    _common(p)
    p.add_argument("--yes", action="store_true", help="really delete (default: dry run)")
    p.add_argument("--min-age", type=float, default=3600, help="leave unfinished dirs younger than this (s)")

    p = sub.add_parser("verify", help="check every committed file of the store against its manifest")
    p.add_argument("stages", nargs="*", metavar="STAGE", help="only these stages (default: every committed stage dir)")
    p.add_argument("--store")
    p.add_argument("--jobs", type=int, default=8, help="files hashed in parallel (default 8)")

    p = sub.add_parser("report", help="print the committed report of a config (builds nothing)")
    _common(p)

    for name, text in (("chat", "chat with a model in the terminal"), ("serve", "serve a model: web UI + OpenAI API")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--store")
        p.add_argument("--model", help="key prefix or stage name (default: the newest rl, sft, mid or base model)")
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto: CUDA when present (bf16, TF32), else CPU (fp32)")
        if name == "chat":
            p.add_argument("-p", "--prompt", help="one prompt, print the reply and exit")
            p.add_argument("--temperature", type=float, default=0.6)
            p.add_argument("--top-k", type=int, default=50)
            p.add_argument("--max-tokens", type=int, default=512)
        else:
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=8000)
            p.add_argument("--max-concurrency", type=int, default=16)
            p.add_argument("--max-queue", type=int, default=64)
            p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                           help="require this Bearer key (repeatable; also $NANOPIPE_API_KEY, comma-separated)")
            p.add_argument("--allowed-host", action="append", default=None, metavar="HOST",
                           help="accepted Host header (repeatable; default: the bound address when not loopback)")
            p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                           help="let pages from ORIGIN call the API (repeatable; default: CORS off)")
            p.add_argument("--max-body-bytes", type=int, default=1 << 20)
            p.add_argument("--max-per-client", type=int, default=16, help="requests in flight per client (429 past it)")
            p.add_argument("--no-tools", action="store_true", help="do not run the model's python tool calls")
            p.add_argument("--allow-unsandboxed-tools", action="store_true",
                           help="serve tools beyond loopback even without OS isolation (bubblewrap)")

    p = sub.add_parser("export", help="write a model from the store as a Hugging Face transformers directory")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--model", help="key prefix or stage name (default: the newest rl, sft, mid or base model)")
    p.add_argument("--store")
    p.add_argument("--dtype", default="float32", help="of model.safetensors: float32 (default) or bfloat16")

    p = sub.add_parser("push", help="upload an export to the Hugging Face hub (token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--repo", required=True, help="hub repo id, e.g. you/nanochat-d20")
    p.add_argument("--model", help="an export's key prefix, or a model to export now (key prefix or stage name); "
                                   "default: the newest export, else the newest model")
    p.add_argument("--private", action="store_true")
    p.add_argument("--store")
    p.add_argument("--dtype", default="float32", help="when exporting now: float32 (default) or bfloat16")

    p = sub.add_parser("ui", help="start a local Prefect server with pools, workers and deployments")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--store")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        # Validate everything before any work, so bad input never touches the store.
        cfg = load_config(args.preset, args.overrides) if hasattr(args, "preset") else None
        if args.cmd == "run":
            order = plan_stages(_split(args.stages) or None, _split(args.force))
        elif args.cmd == "stage":
            order = plan_stages([args.name], [args.name] if args.force else [])
        elif args.cmd == "verify":
            check_names(args.stages, "stage")
        elif args.cmd == "plan":
            _plan(cfg, args)
            return
        store = Store(args.store)
        if args.cmd in ("run", "stage"):
            force = _split(args.force) if args.cmd == "run" else ([args.name] if args.force else [])
            _preflight(store, cfg, order, force)
    except (ConfigError, PlanError, StoreError, ValueError) as e:
        print(f"nanopipe: error: {e}", file=sys.stderr)
        sys.exit(2)

    try:
        if args.cmd == "run" and not args.no_prefect:
            _run_prefect(args, store)
        elif args.cmd in ("run", "stage"):
            from nanopipe.runner import run_pipeline

            t0 = time.time()
            done = run_pipeline(store, cfg, order, force)
            _print_summary({k: m for k, (m, _) in done.items()},
                           {k: "Reused" if r else "Built" for k, (_, r) in done.items()}, time.time() - t0)
        elif args.cmd == "status":
            _status(store, cfg, args.json)
        elif args.cmd == "artifacts":
            _artifacts(store, cfg, args)
        elif args.cmd == "gc":
            _gc(store, cfg, args)
        elif args.cmd == "report":
            _report(store, cfg)
        elif args.cmd == "verify":
            from nanopipe.verify import verify_main

            sys.exit(verify_main(args.store, args.stages, args.jobs))
        else:
            _other(args)
    except (StoreError, LaunchError, ConfigError) as e:
        # A store that cannot be written or read back, a failed training process, a setting a stage found
        # unusable once it saw its inputs (base_train: more steps than data): its message, no traceback.
        print(f"nanopipe: error: {e}", file=sys.stderr)
        sys.exit(1 if args.cmd in ("run", "stage") else 2)


def _plan(cfg, args) -> None:
    """`nanopipe plan`: the plan of a config, as a table or JSON (nanopipe.plan); runs nothing."""
    from nanopipe.plan import plan, render

    p = plan(cfg, gpus=args.gpus, gpu=args.gpu, mfu=args.mfu, price_per_gpu_hour=args.price_per_gpu_hour,
             mid_tokens=args.mid_tokens, sft_conversations=args.sft_conversations)
    print(json.dumps(p, indent=1) if args.json else render(p))


def _preflight(store: Store, cfg, order: list[str], force: list[str]) -> None:
    """Read every committed manifest the run would reuse (all that can be known before it starts),
    so a damaged one stops it here, before any work; a forced stage's is not read (it is rebuilt)."""
    from nanopipe.runner import committed

    committed(store, cfg, order, skip=force)


def _other(args) -> None:
    """Commands that hand over to another module; their bad input is one line and exit 2."""
    try:
        if args.cmd == "chat":
            from nanopipe.serve.chat_cli import chat_main

            chat_main(args.store, args.model, args.prompt, args.temperature, args.top_k, args.max_tokens, args.device)
        elif args.cmd == "serve":
            from nanopipe.serve.app import serve_main

            keys = tuple(args.api_key) + tuple(k for k in os.environ.get("NANOPIPE_API_KEY", "").split(",") if k)
            serve_main(args.store, args.model, args.host, args.port, args.device, args.max_concurrency, args.max_queue,
                       api_keys=keys, allowed_hosts=tuple(args.allowed_host) if args.allowed_host else None,
                       cors_origins=tuple(args.cors_origin),
                       max_body_bytes=args.max_body_bytes, max_per_client=args.max_per_client,
                       tools=not args.no_tools, allow_unsandboxed_tools=args.allow_unsandboxed_tools)
        elif args.cmd == "export":
            from nanopipe.export import export_main

            export_main(args.store, args.out, args.model, args.dtype)
        elif args.cmd == "push":
            from nanopipe.export import push_main

            push_main(args.store, args.repo, args.model, args.private, args.dtype)
        elif args.cmd == "ui":
            from flows.ui import UIError, ui_main

            try:
                ui_main(args.host, args.port, args.store)
            except UIError as e:
                raise ValueError(str(e)) from None
    except (StoreError, ValueError) as e:
        print(f"nanopipe: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ImportError as e:
        print(f"nanopipe: error: {e}; run `make setup`", file=sys.stderr)
        sys.exit(2)


def _run_prefect(args, store: Store) -> None:
    try:
        from flows.pipeline import pipeline, task_states
    except ImportError as e:
        print(f"nanopipe: error: Prefect flows unavailable ({e}); use --no-prefect or run `make setup`", file=sys.stderr)
        sys.exit(2)
    t0 = time.time()
    state = pipeline(preset=args.preset, overrides=args.overrides, stages=_split(args.stages) or None,
                     force=_split(args.force), store=store.url, return_state=True)
    if not state.is_completed():
        print(f"nanopipe: pipeline {state.name}: {state.message}", file=sys.stderr)
        sys.exit(1)
    manifests = state.result()
    _print_summary(manifests, task_states(state.state_details.flow_run_id), time.time() - t0)


def _print_summary(manifests: dict[str, dict], states: dict[str, str], seconds: float) -> None:
    print(f"\n{'stage':<12} {'state':<10} {'key':<16}  {'built in':>9}  metrics")
    for name, m in manifests.items():
        print(f"{name:<12} {states.get(name, '?'):<10} {m['key'][:16]}  {m['timings']['seconds']:>8.1f}s  {_brief(m['metrics'])}")
    print(f"done in {seconds:.1f}s")


def _brief(metrics: dict, n: int = 5) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str, bool))][:n]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def _age(iso: str) -> str:
    s = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(iso)).total_seconds()
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def config_status(store: Store, cfg) -> list[dict]:
    """For each stage: key (when computable), built or not, metrics, age; for one not built, why
    (nanopipe.why: what differs from its closest committed build) and, while a run builds it, that run
    (runner.activity: who holds its lock, its latest progress)."""
    from nanopipe.runner import activity, lookup
    from nanopipe.why import why

    built: dict[str, dict] = {}
    rows = []
    for name in STAGES:
        ups = {u: built[u] for u in STAGES[name] if u in built}
        # a stage whose upstream is not built has no key yet; why() still compares config and code
        key, m = lookup(store, cfg, name, ups) if len(ups) == len(STAGES[name]) else (None, None)
        row = {"stage": name, "built": m is not None, "key": key}
        if m is not None:
            built[name] = m
            row.update(metrics=m["metrics"], created_at=m["created_at"], seconds=m["timings"]["seconds"])
        else:
            row["why"] = why(store, cfg, name, ups)
            if key is not None:
                row["running"] = activity(store, name, key)
        rows.append(row)
    return rows


def _status(store: Store, cfg, as_json: bool) -> None:
    rows = config_status(store, cfg)
    if as_json:
        print(json.dumps({"store": store.url, "preset": cfg.preset, "stages": rows}, indent=1))
        return
    print(f"store {store.url} | preset {cfg.preset}")
    for r in rows:
        key = r["key"][:16] if r["key"] else "-"
        if r["built"]:
            print(f"  built    {r['stage']:<12} {key:<16}  {_age(r['created_at']):>9}  {_brief(r['metrics'])}")
            continue
        why = r["why"]
        closest = why["closest"]
        if r.get("running"):
            print(f"  {'running':<8} {r['stage']:<12} {key:<16}  {_describe_run(r['running'])}")
        else:
            print(f"  {why['state']:<8} {r['stage']:<12} {key:<16}" + ("" if closest is None else
                  f"  vs {r['stage']}/{closest['key'][:16]}, built {_age(closest['created_at'])}:"))
        for reason in why["reasons"]:
            print(f"             {reason}")


def _describe_run(run: dict) -> str:
    """`step 12/60 (20%), ETA 1m30s, pid 123 on host` from a run's lock holder and progress."""
    p, who = run.get("progress"), run.get("holder")
    parts = []
    if p and p.get("total"):
        parts.append(f"step {p.get('step')}/{p['total']} ({p.get('percent', 0):.0f}%)")
        if p.get("eta_s") is not None:
            parts.append(f"ETA {fmt_eta(p['eta_s'])}")
    elif who is not None:
        parts.append("no progress reported yet")
    if who:
        parts.append(f"pid {who.get('pid')} on {who.get('host')}, since {who.get('started_at')}")
    elif who is None:
        parts.append(f"on another host (progress of {p.get('updated_at')})")
    else:
        parts.append("only ranks of an earlier run are left")
    return ", ".join(parts)


def _artifacts(store: Store, cfg, args) -> None:
    from nanopipe.report import lineage_tree

    try:
        if args.acmd == "ls":
            bad: list[tuple[str, str]] = []
            for m in store.manifests(args.stage, bad=bad):
                ups = " ".join(f"{k}:{v['key'][:8]}" for k, v in m["upstream"].items())
                print(f"{m['stage']:<12} {m['key'][:16]}  {m['created_at']}  {len(m['files']):>4} files  "
                      f"{_brief(m['metrics'], 3)}  {('<- ' + ups) if ups else ''}")
            for path, problem in bad:
                print(f"BAD {store.url_of(path)}: {problem}")
            if bad:
                sys.exit(1)
        elif args.name in NIGHTLY_KEYS:
            _show_nightly(store)
        else:
            m = _find(store, cfg, args.name)
            print(json.dumps({k: v for k, v in m.items() if k != "files"}, indent=1))
            print("files:")
            for f in m["files"]:
                print(f"  {f['path']:<40} {f['bytes']:>12,}  {f['sha256'][:16]}")
            print("lineage:")
            print(lineage_tree(store, m))
    except StoreError as e:
        print(f"nanopipe: error: {e}", file=sys.stderr)
        sys.exit(2)


def _find(store: Store, cfg, name: str) -> dict:
    """The manifest NAME means: a stage (or one of its Prefect artifact keys): its build for this
    config; else a key prefix or stage/key."""
    from nanopipe.runner import committed

    stage = name if name in STAGES else stage_of(name)
    if stage is None:
        return store.find(name.split("/")[-1])
    built = committed(store, cfg)
    if stage in built:
        return built[stage]
    newest = store.manifests(stage)
    hint = (f"; the newest {stage} in the store is {stage}/{newest[-1]['key'][:16]}, built "
            f"{_age(newest[-1]['created_at'])}: `nanopipe artifacts show {newest[-1]['key'][:16]}`") if newest else ""
    raise StoreError(f"{stage} is not built for preset {cfg.preset} (with these overrides) in {store.url}{hint}")


def _show_nightly(store: Store) -> None:
    """The newest nightly eval record: what the nightly-eval-table and -summary artifacts show."""
    from nanopipe.eval.nightly import read_records

    records = read_records(store)
    if not records:
        raise StoreError(f"no nightly eval record in {store.url}; the nightly-eval/eval deployment writes them")
    r = records[-1]
    print(f"nightly eval {r['created_at']} ({r['url']}); settings: {json.dumps(r.get('settings'))}")
    print(f"baseline: {r.get('baseline') or 'none (a new baseline)'}; regressions: {', '.join(r.get('regressions', [])) or 'none'}")
    for stage, res in r["results"].items():
        for metric, value in res["metrics"].items():
            se = (res.get("stderr") or {}).get(metric)
            print(f"  {stage:<12} {res['key'][:16]}  {metric:<28} {value:.4f}" + (f" ± {se:.4f}" if se is not None else ""))


def _gc(store: Store, cfg, args) -> None:
    """Keep the lineage of what the given config has built, and unfinished dirs that run or are recent;
    drop other committed dirs and old unfinished ones. Says what it keeps and why."""
    from nanopipe.lineage import label, walk
    from nanopipe.runner import committed, running

    built = list(committed(store, cfg).values())
    keep = {m["key"]: (m, f"built for preset {cfg.preset} (this config)") for m in built}
    for m in built:
        for up in walk(store, m):
            if up.manifest is not None and up.key not in keep:
                keep[up.key] = (up.manifest, f"upstream of {label(m)}")
    kept = [(store.stage_dir(m["stage"], m["key"]), why) for m, why in keep.values()]
    doomed = [(store.stage_dir(m["stage"], m["key"]), "unreferenced") for m in store.manifests()
              if m["key"] not in keep]
    for stage, d, age in store.unfinished():
        holder = running(store, stage, d.rsplit("/", 1)[-1])
        if holder is not None:
            kept.append((d, f"unfinished, running ({_describe_run({'holder': holder})})"))
        elif age < args.min_age:
            kept.append((d, f"unfinished, {age / 3600:.1f}h old: younger than --min-age, may be resumed"))
        else:
            doomed.append((d, f"unfinished, {age / 3600:.1f}h old"))
    for d, why in kept:
        print(f"keeping {store.url_of(d)}  ({why})")
    for d, why in doomed:
        print(f"{'removing' if args.yes else 'would remove'} {store.url_of(d)}  ({why})")
        if args.yes:
            store.remove(d)
    print(f"{len(doomed)} dirs {'removed' if args.yes else 'to remove (dry run; pass --yes to delete)'}; kept {len(kept)}")


def _report(store: Store, cfg) -> None:
    """Print the committed report.md of a config (and where its plots are); builds nothing."""
    from nanopipe.runner import committed

    built = committed(store, cfg)
    m = built.get("report")
    try:
        if m is None:
            raise StoreError(f"no committed report for preset {cfg.preset!r} (and these overrides) in {store.url}; "
                             f"not built: {', '.join(s for s in STAGES if s not in built)}. "
                             f"Build it with `nanopipe run --preset {cfg.preset}`")
        print(store.read_bytes(m, "report.md").decode(), end="")
    except StoreError as e:
        print(f"nanopipe: error: {e}", file=sys.stderr)
        sys.exit(2)
    plots = sorted(f["path"] for f in m["files"] if f["path"].startswith("plots/"))
    if plots:
        print(f"\n(plots: {', '.join(store.url_of(store.path_of(m, p)) for p in plots)})")
