"""Stage 11: the report — report.md (+ loss-curve PNGs and report.json) from every upstream manifest.

It reads whatever upstream stages the DAG gives it (ctx.upstream), so adding a stage to the
pipeline adds it to the report; anything missing shows as "-".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanopipe.report import build_report, git_info

if TYPE_CHECKING:
    from nanopipe.runner import StageContext

VERSION = 1


def run(ctx: "StageContext") -> dict:
    rep = build_report(ctx.store, ctx.upstream, git=git_info(), gpu_hour_usd=ctx.config.gpu_hour_usd)
    for rel, png in rep.plots.items():
        ctx.writer.write_bytes(rel, png)
    ctx.writer.write_json("report.json", rep.data)
    ctx.writer.write_bytes("report.md", rep.markdown.encode())
    ctx.log(f"[report] {len(ctx.upstream)} stages, {len(rep.plots)} plot(s), "
            f"wall time {rep.data['total_seconds']:.1f}s, est. cost "
            f"{'-' if rep.data['cost_usd'] is None else '$%.2f' % rep.data['cost_usd']}")
    return {"stages": len(ctx.upstream), "plots": len(rep.plots), "total_seconds": rep.data["total_seconds"],
            "cost_usd": rep.data["cost_usd"], "git_commit": rep.data["git"].get("commit")}
