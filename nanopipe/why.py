"""Why a stage will (re)run: what differs between now and the closest committed build of the stage.

A stage's key covers its config section, its code (``nanopipe.codeid``) and its upstream outputs;
every manifest records all three, so comparing them with what they are now names the cause:

    config: base_train.depth 4 -> 6
    code: nanopipe.train.common changed
    upstream: base_train has different outputs (was 0a1b2c3d4e5f6a7b, now 9f8e7d6c5b4a3928)

The closest build is the one with the fewest differences (the newest among equals).
"""

from __future__ import annotations

import json

from nanopipe.codeid import stage_code
from nanopipe.config import RunConfig
from nanopipe.stages import STAGES
from nanopipe.store import Store, StoreError, output_digest

VALUE_CHARS = 40


def why(store: Store, cfg: RunConfig, name: str, upstream: dict[str, dict]) -> dict:
    """Why stage ``name`` is not built for ``cfg``. ``upstream``: the upstream manifests built for
    ``cfg`` (an upstream stage not among them is not built and runs first).

    Returns {"state": "missing" (no build to compare with) | "stale" (its config, code or upstream
    outputs differ) | "pending" (only its upstream is not built yet: if that rebuild reproduces the
    same bytes, this stage is reused), "closest": {key, created_at} or None, "config": [{field, old, new}],
    "code": {changed, added, removed: [module], version: [old, new] VERSION or None,
             code_version: [old, new] where the build recorded no module digests, or None},
    "upstream": [{stage, change: "not built" | "different outputs" | "added" | "removed", old, new}],
    "reasons": [one line per kind of difference]}.
    """
    now = {"config": cfg.section(name), **stage_code(name),
           "upstream": {u: upstream[u] for u in STAGES[name] if u in upstream}}
    try:
        builds, note = store.manifests(name), "never built"
    except (StoreError, ValueError) as e:  # an unreadable manifest must not hide the rest of status
        builds, note = [], f"cannot compare with earlier builds: {e}"
    if not builds:
        out = {"state": "missing", "closest": None, "config": [], "code": _no_code_change(),
               "upstream": [{"stage": u, "change": "not built", "old": None, "new": None}
                            for u in STAGES[name] if u not in now["upstream"]]}
        out["reasons"] = [note, *_reasons(out)]
        return out
    diffs = [_diff(now, name, m) for m in builds]
    # Fewest differences; among equals the newest (builds come oldest first, so the last one wins).
    best = min(range(len(diffs)), key=lambda i: (_count(diffs[i]), -i))
    out, m = diffs[best], builds[best]
    out["closest"] = {"key": m["key"], "created_at": m["created_at"]}
    own = out["config"] or any(out["code"].values()) or any(u["change"] != "not built" for u in out["upstream"])
    reasons = _reasons(out)
    out["state"] = "pending" if reasons and not own else "stale"
    out["reasons"] = reasons or [f"no recorded difference from {name}/{m['key'][:16]} "
                                 "(its manifest predates what this nanopipe records)"]
    return out


def _diff(now: dict, name: str, m: dict) -> dict:
    config = [{"field": f"{name}.{path}", "old": old, "new": new}
              for path, old, new in _changed_fields(m.get("config", {}), now["config"])]

    old_code = m.get("code") or {}
    old_modules, new_modules = old_code.get("modules"), now["code"]["modules"]
    code = _no_code_change()
    if old_modules is None:  # built before manifests recorded module digests
        if m.get("code_version") != now["code_version"]:
            code["code_version"] = [m.get("code_version"), now["code_version"]]
    else:
        code["changed"] = sorted(k for k in new_modules.keys() & old_modules.keys()
                                 if new_modules[k] != old_modules[k])
        code["added"] = sorted(new_modules.keys() - old_modules.keys())
        code["removed"] = sorted(old_modules.keys() - new_modules.keys())
    if "version" in old_code and old_code["version"] != now["code"]["version"]:
        code["version"] = [old_code["version"], now["code"]["version"]]

    ups = []
    old_ups = m.get("upstream", {})
    for u in sorted(set(STAGES[name]) | set(old_ups)):
        old = old_ups.get(u)
        if u not in STAGES[name]:
            ups.append({"stage": u, "change": "removed", "old": old["key"], "new": None})
        elif u not in now["upstream"]:
            ups.append({"stage": u, "change": "not built", "old": old and old["key"], "new": None})
        elif old is None:
            ups.append({"stage": u, "change": "added", "old": None, "new": now["upstream"][u]["key"]})
        elif old["digest"] != output_digest(now["upstream"][u]):
            ups.append({"stage": u, "change": "different outputs", "old": old["key"],
                        "new": now["upstream"][u]["key"]})
    return {"state": None, "closest": None, "config": config, "code": code, "upstream": ups}


def _no_code_change() -> dict:
    return {"changed": [], "added": [], "removed": [], "version": None, "code_version": None}


def _count(d: dict) -> int:
    code = d["code"]
    return (len(d["config"]) + len(code["changed"]) + len(code["added"]) + len(code["removed"])
            + (code["version"] is not None) + (code["code_version"] is not None) + len(d["upstream"]))


def _reasons(d: dict) -> list[str]:
    """One line per kind of difference, as `status` prints them."""
    out = []
    if d["config"]:
        out.append("config: " + ", ".join(f"{c['field']} {_short(c['old'])} -> {_short(c['new'])}"
                                          for c in d["config"]))
    code = d["code"]
    if code["version"]:
        out.append(f"code: VERSION {code['version'][0]} -> {code['version'][1]}")
    parts = [f"{', '.join(code[k])} {k}" for k in ("changed", "added", "removed") if code[k]]
    if parts:
        out.append("code: " + "; ".join(parts))
    if code["code_version"]:
        out.append("code: version {} -> {} (that build recorded no module digests)".format(*code["code_version"]))
    waits = [u["stage"] for u in d["upstream"] if u["change"] == "not built"]
    if waits:
        out.append(f"upstream: {', '.join(waits)} {'is' if len(waits) == 1 else 'are'} not built for this config "
                   f"({'it runs' if len(waits) == 1 else 'they run'} first)")
    for u in d["upstream"]:
        if u["change"] == "not built":
            continue
        if u["change"] == "different outputs":
            was = "rebuilt" if u["old"] == u["new"] else f"was {u['old'][:16]}, now {u['new'][:16]}"
            out.append(f"upstream: {u['stage']} has different outputs ({was})")
        else:
            out.append(f"upstream: {u['stage']} was {u['change']} as an upstream of this stage")
    return out


def _changed_fields(old: dict, new: dict, prefix: str = ""):
    """(dotted path, old, new) for each leaf that differs; a missing side is None."""
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _changed_fields(a, b, f"{prefix}{k}.")
        elif a != b:
            yield f"{prefix}{k}", a, b


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS - 1] + "…"
