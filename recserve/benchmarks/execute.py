"""`recserve bench run` once its flags are checked: check the target, sweep, compare with raw, report.

Order matters: the target is checked (health + Info, one call each) before any load is sent. Every failure
before the load is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from recserve.benchmarks import report
from recserve.benchmarks.config import RunConfig, settings, workload_of
from recserve.benchmarks.protocols import DESCRIPTIONS, TargetInfo, as_target, open_target
from recserve.benchmarks.results import RawLimit, Series, SummaryItem
from recserve.benchmarks.sweep import ProgressLine, sweep
from recserve.benchmarks.targets import check_target, connected
from recserve.benchmarks.workloads import Workload
from recserve.client import ServerInfo

BATCHING_OFF = "batching off"


async def execute(config: RunConfig, err: TextIO | None = None) -> int:
    """`bench run` after its flags were checked: returns the exit code. Raises ConfigError when the workload
    cannot be built, TargetError or ServerStartError when a target cannot take the load."""
    err = err or sys.stderr
    from recserve.benchmarks.servers import local_server

    workload = workload_of(config.workload)
    progress = ProgressLine(err) if config.progress else None
    notes: list[str] = []
    doc = report.new_document("run", config.command, settings(config))
    series: list[Series] = []
    endpoint = config.endpoint
    async with open_target(endpoint, config.access) as target:
        info = await target.check(config.workload, notes)
        if endpoint.protocol != "recserve":
            notes.append(
                f"{endpoint.url} speaks {DESCRIPTIONS[endpoint.protocol]}: no server-side figures (batch "
                "sizes, padding, queue) beside the client's; those come from a recserve server's metrics"
            )
        raw = await _raw_limit(config, workload, info, notes)
        raw_tps = raw.texts_per_s if raw else None
        steps = await sweep(
            target,
            config.plans(),
            workload,
            metrics_url=target.metrics_url,
            progress=progress,
            raw_texts_per_s=raw_tps,
        )
        series.append(
            Series(
                name="target",
                target=endpoint.url,
                protocol=endpoint.protocol,
                server=info,
                steps=tuple(steps),
            )
        )
    if config.batching_off and config.model_repo is not None:
        log = config.out / "server-batching-off.log"
        async with (
            local_server(
                config.model_repo, threads=config.threads, log_path=log, extra=["--max-batch-size", "1"]
            ) as srv,
            connected(srv.address) as client,
        ):
            off_info = await check_target(client, srv.address)
            steps = await sweep(
                as_target(client),
                config.plans(),
                workload,
                metrics_url=srv.metrics_url,
                progress=progress,
                raw_texts_per_s=raw_tps,
                series=BATCHING_OFF,
            )
            series.append(Series(name=BATCHING_OFF, target=srv.address, server=off_info, steps=tuple(steps)))
    done = replace(
        doc,
        workload=workload.describe(),
        raw=raw,
        series=tuple(series),
        summary=run_summary(series, raw),
        notes=tuple(notes),
    )
    report.publish(done, config.out, config.markdown)
    bad = [s.label for ser in series for s in ser.steps if not s.consistency.ok]
    if bad:
        print(
            f"recserve bench: inconsistent figures in {', '.join(bad)} (a harness bug; see results.json)",
            file=err,
        )
        return 1
    return 0


def run_summary(series: Sequence[Series], raw: RawLimit | None) -> dict[str, SummaryItem]:
    """Headline figures of a run: each series' best throughput and, beside it, the raw limit ratio."""
    out: dict[str, SummaryItem] = {}
    for ser in series:
        best, item = ser.peak, ser.peak_item()
        if best is None or item is None:
            continue
        m = best.measured
        out[f"{ser.name}_peak"] = item
        if best.ratio_to_raw is not None and raw is not None:
            out[f"{ser.name}_raw_ratio"] = SummaryItem(
                title=f"Peak over the raw limit ({ser.name})",
                value=best.ratio_to_raw,
                how=f"{m.texts_per_s} texts/s over {raw.texts_per_s} in process",
            )
    return out


async def _raw_limit(
    config: RunConfig, workload: Workload, info: TargetInfo, notes: list[str]
) -> RawLimit | None:
    if config.model_repo is None:
        return None
    from recserve.benchmarks.baseline import RawModel, raw_limit
    from recserve.manifest import Manifest

    manifest = Manifest.load(config.model_repo)
    if not isinstance(info, ServerInfo):
        notes.append(
            f"the raw limit runs {manifest.model_name} from --model-repo; {config.target} cannot say which "
            f"weights it serves ({info.model_name or 'no model name'}, dimension {info.dimension}), so the "
            "ratios hold only if it serves the same model"
        )
    elif manifest.source.weights_sha256 != info.weights_sha256:
        notes.append(
            f"the raw limit runs {manifest.model_name} from --model-repo, but the target serves "
            f"{info.model_name} (weights {info.weights_sha256[:12]}): the ratios compare different models"
        )

    def measure(repo: Path) -> RawLimit:
        return raw_limit(RawModel(repo, threads=config.threads, query=workload.texts[0]), workload.texts)

    return await asyncio.to_thread(measure, config.model_repo)
