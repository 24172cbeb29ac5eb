"""A committed output's history: the upstream manifests it was built from, and theirs, recursively.

Every manifest lists its upstream stages by key (and the output digest it read). `walk` follows
those links breadth first, so the nearest ancestors come first; everything that asks about
lineage goes through it:

    ancestor(store, m, "tokenizer")    the nearest committed tokenizer m was built from
    closure(store, [m1, m2])           m1, m2 and everything upstream of them that is still stored (gc)
    graph(store, m)                    each reachable manifest's direct upstream (`nanopipe artifacts show`)

An upstream that is no longer in the store is reported, not skipped: `ancestor` names it in its
StoreError; `walk` yields it with `manifest=None`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from nanopipe.dag import in_order
from nanopipe.store import Store, StoreError


@dataclass(frozen=True)
class Upstream:
    """One link of a lineage: `of` was built from `stage`/`key` (whose outputs then had `digest`)."""

    of: dict
    stage: str
    key: str
    digest: str | None
    manifest: dict | None  # the upstream's committed manifest; None when it is no longer in the store

    def __str__(self) -> str:
        return f"{self.stage}/{self.key[:16]}"


def label(manifest: dict) -> str:
    return f"{manifest['stage']}/{manifest['key'][:16]}"


def walk(store: Store, manifest: dict) -> Iterator[Upstream]:
    """Every upstream link of `manifest`'s history, nearest first (breadth first, pipeline order
    within a level). A manifest reached twice is read and expanded once; each link is yielded."""
    seen = {manifest["key"]: manifest}
    todo = deque([manifest])
    while todo:
        m = todo.popleft()
        ups = m["upstream"]
        for stage in in_order(ups):
            key = ups[stage]["key"]
            if key not in seen:
                seen[key] = store.manifest(stage, key)
                if seen[key] is not None:
                    todo.append(seen[key])
            yield Upstream(m, stage, key, ups[stage].get("digest"), seen[key])


def ancestor(store: Store, manifest: dict, stage: str) -> dict:
    """The nearest committed `stage` manifest in `manifest`'s lineage; a StoreError naming what is
    missing when it is not there (or no longer in the store)."""
    gone = []
    for up in walk(store, manifest):
        if up.stage == stage and up.manifest is not None:
            return up.manifest
        if up.manifest is None:
            if up.stage == stage:
                raise StoreError(f"{up} (upstream of {label(up.of)}) is no longer in the store")
            gone.append(f"{up} (upstream of {label(up.of)})")
    missing = f"; part of its lineage is no longer in the store: {', '.join(gone)}" if gone else ""
    raise StoreError(f"{label(manifest)}: no {stage} stage in its lineage{missing}")


def closure(store: Store, manifests: Iterable[dict]) -> dict[str, dict]:
    """key -> manifest of the given manifests and every ancestor of theirs still in the store."""
    out = {}
    for m in manifests:
        if m["key"] in out:
            continue
        out[m["key"]] = m
        out.update((up.key, up.manifest) for up in walk(store, m) if up.manifest is not None)
    return out


def graph(store: Store, manifest: dict) -> dict[str, list[Upstream]]:
    """key -> direct upstream links (pipeline order) of `manifest` and of every ancestor still stored."""
    out: dict[str, list[Upstream]] = {manifest["key"]: []}
    for up in walk(store, manifest):
        out.setdefault(up.of["key"], []).append(up)
        if up.manifest is not None:
            out.setdefault(up.key, [])
    return out
