"""A Prefect cache policy whose key is the nanopipe store key.

Prefect's default policy mixes in the run id and hashes only the task's own text; ours is the
content address of the stage (name, code version, config section, upstream outputs), so a
stage built by any run, on any host, shows as Cached, even after the Prefect database is wiped.
The cache record lives inside the stage's store dir, so removing the stage dir (gc, --force)
removes its record too and Prefect can never return a manifest the store no longer has; a
stage committed without Prefect gets its record written here, so it shows as Cached too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem

from nanopipe.config import RunConfig
from nanopipe.runner import lookup
from nanopipe.store import Store


def result_storage(store: Store) -> WritableFileSystem:
    """A (saved) Prefect filesystem block rooted at the store, where cache records are kept."""
    block = LocalFileSystem(basepath=store.url) if store.is_local else RemoteFileSystem(basepath=store.url)
    block.save(f"nanopipe-store-{hashlib.sha256(store.url.encode()).hexdigest()[:12]}", overwrite=True)
    return block


@dataclass
class StoreKeyPolicy(CachePolicy):
    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        if inputs.get("force"):
            return None
        store = Store(inputs["store_url"])
        stage = inputs["stage"]
        key, manifest = lookup(store, RunConfig.model_validate(inputs["config"]), stage, inputs["upstream"])
        name = store.prefect_record(stage, key)  # the cache key: the record's path in the store
        if manifest is not None:
            # Built outside Prefect (`nanopipe stage`, another tool): record it so Prefect reports Cached.
            results = task_ctx.result_store
            if not results.exists(name):
                results.write(obj=manifest, key=name)
        else:
            # A record without a committed manifest is stale (the dir was half-removed): drop it.
            stale = store.prefect_record_path(stage, key)
            if store.fs.exists(stale):
                store.fs.rm(stale)
        return name
