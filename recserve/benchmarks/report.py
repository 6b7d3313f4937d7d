"""Reports of a run, all written from its Document: a terminal table, the JSON (every number), a Markdown
summary, PNG plots."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TextIO

from recserve.benchmarks.protocols import DESCRIPTIONS
from recserve.benchmarks.results import (
    WEIGHTS_SHA256,
    Document,
    Json,
    LoadStep,
    Machine,
    PeerInfo,
    Series,
    StepResult,
    SummaryItem,
    to_json,
)

SCHEMA = "recserve-bench/1"
PACKAGES = (
    "recserve",
    "grpcio",
    "protobuf",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "tokenizers",
    "matplotlib",
)
LATENCY_TITLES = ("p50", "p90", "p99", "p99.9", "max")
Mode = Literal["closed", "open"]
_MARKERS: tuple[tuple[Mode, str], ...] = (("closed", "o"), ("open", "s"))


# --- context: machine and versions --------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_cores() -> int | None:
    """The cores this process may run on (its affinity: a container's cpuset), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_info() -> Machine:
    return Machine(
        cpu_model=_cpu_model(),
        cores=os.cpu_count(),
        usable_cores=usable_cores(),
        memory_gib=_memory_gib(),
        platform=platform.platform(),
        python=platform.python_version(),
        load_average_start=load_average(),
    )


def load_average() -> tuple[float, ...] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:  # not available on this platform
        return None


def busy_note(machine: Machine) -> str | None:
    """A warning when other work shared the CPUs as the run started: the figures are then too low."""
    load, cores = machine.load_average_start, machine.usable_cores or 1
    if load and load[0] > 0.5 * cores:
        return (
            f"the machine was busy when the run started (1-minute load {load[0]} on {cores} cores): other "
            "work shared the CPUs, so throughput is likely understated and latency overstated"
        )
    return None


def versions() -> dict[str, str]:
    # Package metadata only: importing onnxruntime or matplotlib just to read a version would be slow.
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


Kind = Literal["run", "suite", "overload", "soak", "fleet", "gpu-check"]
TITLES: dict[Kind, str] = {
    "gpu-check": "recserve GPU check: fp16 on CUDA",
    "run": "recserve benchmark run",
    "suite": "recserve benchmarks",
    "overload": "recserve overload benchmark",
    "soak": "recserve soak",
    "fleet": "recserve fleet: replicas behind one client, and the backlog under a load step",
}


def new_document(kind: Kind, command: str, settings: dict[str, Json]) -> Document:
    """A document stamped with the time, machine and versions at the start; the results come later."""
    return Document(
        schema=SCHEMA,
        kind=kind,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        command=command,
        settings=settings,
        machine=machine_info(),
        versions=versions(),
    )


def finish(doc: Document) -> Document:
    """The document as it ends: the load average at the end, and a note if the machine was busy."""
    notes = doc.notes
    note = busy_note(doc.machine)
    if note and note not in notes:
        notes = (*notes, note)
    return replace(doc, machine=replace(doc.machine, load_average_end=load_average()), notes=notes)


# --- terminal -----------------------------------------------------------------------------------------


def _fmt(value: float | str | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def step_row(step: StepResult) -> list[str]:
    m, server = step.measured, step.server
    return [
        step.label,
        str(m.sent),
        str(m.completed),
        str(m.failed),
        _fmt(m.calls_per_s),
        _fmt(m.texts_per_s),
        _fmt(step.ratio_to_raw, 2),
        *(_fmt(v, 2) for v in m.latency_ms.tail()),
        _fmt(server.mean_batch_size if server else None, 1),
        _fmt(server.padding_ratio if server else None, 2),
        _pct(server.queue_share if server else None),
        _pct(server.inference_share if server else None),
        _pct(step.schedule.late_fraction if step.schedule else None),
    ]


TABLE_HEADER = [
    "step",
    "sent",
    "ok",
    "failed",
    "calls/s",
    "texts/s",
    "x raw",
    *(f"{t} ms" for t in LATENCY_TITLES),
    "batch",
    "padding",
    "queue",
    "infer",
    "late",
]


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = TABLE_HEADER) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def print_tables(doc: Document, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    for series in doc.series:
        print(f"\n{series.name} ({series.target})", file=out)
        print(format_table([step_row(s) for s in series.steps]), file=out)
    if doc.raw:
        raw = doc.raw
        print(
            f"\nraw limit: {raw.texts_per_s:.1f} texts/s in sorted batches of {raw.batch_size} "
            f"({raw.threads} threads); single text p50 {_fmt(raw.single.latency_ms.p50, 2)} ms",
            file=out,
        )
    if doc.kind in ("overload", "soak", "fleet", "gpu-check"):  # their sections are their tables
        for heading, body in (doc.sections or {}).items():
            print(f"\n{heading}\n", file=out)
            print("\n".join(body), file=out)
    for key, item in doc.summary.items():
        print(f"{key}: {_summary_value(item)}", file=out)
    for note in doc.notes:
        print(f"note: {note}", file=out)


# --- JSON ---------------------------------------------------------------------------------------------


def write_json(doc: Document, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(doc), indent=2, allow_nan=False) + "\n")
    return path


# --- plots --------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _steps(series: Series, mode: Mode) -> list[StepResult]:
    """The steps of one loop, in order of offered load (callers or rate)."""
    return sorted((s for s in series.steps if s.mode == mode), key=lambda s: s.offered)


def _color(doc: Document, series: Series) -> str:
    """One colour per series, the same in every plot."""
    return f"C{doc.series.index(series) % 10}"


def _ordered(series: Series) -> list[StepResult]:
    """Every step of a series: the closed loop by callers, then the open loop by rate."""
    return _steps(series, "closed") + _steps(series, "open")


def plot_knee(doc: Document, path: Path, p99_target_ms: float | None = None) -> Path | None:
    """p50 (left) and p99 (right) against delivered throughput: one line per series and loop, the knee.

    Points are joined in order of offered load (callers or rate), so a server whose throughput falls back
    under overload shows it as a curve bending back.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    drawn = False
    for series in doc.series:
        for mode, marker in _MARKERS:
            steps = [s for s in _steps(series, mode) if s.measured.latency_ms.p50 is not None]
            if not steps:
                continue
            xs = [s.measured.texts_per_s for s in steps]
            for ax, key in zip(axes, ("p50", "p99"), strict=True):
                ax.plot(
                    xs,
                    [getattr(s.measured.latency_ms, key) for s in steps],
                    "-" if mode == "closed" else "--",
                    marker=marker,
                    color=_color(doc, series),
                    label=f"{series.name}, {mode} loop",
                )
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if p99_target_ms:
        axes[1].axhline(p99_target_ms, color="grey", linestyle=":", label=f"{p99_target_ms:g} ms")
    for ax, key in zip(axes, ("p50", "p99"), strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("delivered throughput (texts/s)")
        ax.set_title(f"{key} latency")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms, log scale)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Latency against throughput")
    return _save(fig, plt, path)


# The distribution plot's x axis: "nines" of the percentile (90 -> 1, 99 -> 2, ...), the slowest call last.
_MAX_NINES = 4.6
_NINES_TICKS = ((0.0, "min"), (50.0, "50"), (90.0, "90"), (99.0, "99"), (99.9, "99.9"), (99.99, "99.99"))


def _nines(percentile: float) -> float:
    return _MAX_NINES if percentile >= 100 else -math.log10(1 - percentile / 100)


def plot_latency(doc: Document, path: Path) -> Path | None:
    """The latency distribution of every step: latency by percentile, the tail stretched out (as HDR
    histograms plot it), one panel per series and one line per step."""
    panels = [(ser, [s for s in _ordered(ser) if s.latency_distribution]) for ser in doc.series]
    panels = [(ser, steps) for ser, steps in panels if steps]
    if not panels:
        return None
    plt = _pyplot()
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (series, steps) in zip(axes.flat, panels, strict=False):
        for j, step in enumerate(steps):
            dist = step.latency_distribution
            assert dist is not None
            ax.plot(
                [_nines(q) for q in dist.percentiles],
                dist.ms,
                "-" if step.mode == "closed" else "--",
                marker=".",
                color=cmap(j / max(1, len(steps) - 1)),
                label=step.label,
            )
        ax.set_xticks([_nines(q) for q, _ in _NINES_TICKS] + [_MAX_NINES])
        ax.set_xticklabels([label for _, label in _NINES_TICKS] + ["max"])
        ax.set_yscale("log")
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (ms, log scale)")
        ax.set_title(f"{series.name}: latency distribution per step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return _save(fig, plt, path)


def plot_throughput(doc: Document, path: Path) -> Path | None:
    """Closed-loop throughput against the number of callers, with the raw limit for scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for series in doc.series:
        steps = _steps(series, "closed")
        if steps:
            ax.plot(
                [s.concurrency for s in steps],
                [s.measured.texts_per_s for s in steps],
                marker="o",
                label=series.name,
            )
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if doc.raw:
        ax.axhline(doc.raw.texts_per_s, color="grey", linestyle="--", label="raw limit (in-process ORT)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("texts/s")
    ax.set_title("Throughput against concurrency (closed loop)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _bucket_label(le: str) -> str:
    return "<=" + (le if le == "+Inf" else f"{float(le):g}")


def plot_batch_sizes(doc: Document, path: Path) -> Path | None:
    """The batches the server formed in every step, from its metrics: the share of batches per batch-size
    bucket (left, one row per step) and the padding ratio (right, padded over real tokens)."""
    rows = []
    for series in doc.series:
        steps = [s for s in _ordered(series) if s.server and s.server.batches]
        if steps:
            rows.append((series, steps))
    if not rows:
        return None
    plt = _pyplot()
    # The same buckets in every row, so that the servers' rows compare column by column.
    every = [s.server.batch_size_histogram for _, steps in rows for s in steps if s.server]
    buckets = sorted({le for hist in every for le in hist}, key=float)
    used = [b for b in buckets if any(hist.get(b) for hist in every)]
    if used:  # no empty buckets beyond the largest batch seen
        buckets = buckets[: buckets.index(used[-1]) + 1]
    worst = max((s.server.padding_ratio or 1.0 for _, steps in rows for s in steps if s.server), default=1.0)
    height = sum(1.4 + 0.32 * len(steps) for _, steps in rows)
    fig, axes = plt.subplots(
        len(rows), 2, figsize=(13, height), squeeze=False, gridspec_kw={"width_ratios": [3, 1]}
    )
    for (left, right), (series, steps) in zip(axes, rows, strict=True):
        hists = [s.server.batch_size_histogram for s in steps if s.server]
        shares = [[hist.get(b, 0) / (sum(hist.values()) or 1) for b in buckets] for hist in hists]
        left.imshow(shares, aspect="auto", cmap="Blues", vmin=0.0, vmax=1.0)
        for i, row in enumerate(shares):
            for j, share in enumerate(row):
                if share >= 0.01:
                    color = "white" if share > 0.6 else "black"
                    left.text(j, i, f"{share:.0%}", ha="center", va="center", fontsize=6, color=color)
        left.set_xticks(range(len(buckets)))
        left.set_xticklabels([_bucket_label(b) for b in buckets], fontsize=7)
        left.set_yticks(range(len(steps)))
        left.set_yticklabels(
            [f"{s.label} (mean {s.server.mean_batch_size:g})" if s.server else s.label for s in steps],
            fontsize=7,
        )
        left.set_xlabel("texts per batch")
        left.set_title(f"{series.name}: share of batches by size", fontsize=9)
        pads = [s.server.padding_ratio if s.server and s.server.padding_ratio else math.nan for s in steps]
        # Bars from 1.0 (no padding at all): what is drawn is the waste.
        right.barh(range(len(steps)), [p - 1.0 for p in pads], left=1.0, color=_color(doc, series))
        for i, pad in enumerate(pads):
            if math.isfinite(pad):
                right.text(pad, i, f" {pad:.2f}", va="center", fontsize=7)
        right.set_xlim(1.0, 1.0 + max(0.2, (worst - 1.0) * 1.3))
        right.set_ylim(len(steps) - 0.5, -0.5)  # the heat map's row order: first step on top
        right.set_yticks([])
        right.set_xlabel("padded / real tokens")
        right.set_title("padding", fontsize=9)
    return _save(fig, plt, path)


def plot_backlog(load: LoadStep, path: Path) -> Path | None:
    """The backlog gauge over time through a load step, with the HPA's threshold and modelled decisions."""
    points = [(x.t_s, x.backlog_s) for x in load.samples if x.backlog_s is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.axvspan(
        load.load_start_s,
        load.load_end_s,
        color="tab:orange",
        alpha=0.15,
        label=f"open loop at {load.level:g}x capacity ({load.rate_per_s:g} calls/s)",
    )
    ax.plot([t for t, _ in points], [v for _, v in points], marker=".", label="recserve_backlog_seconds")
    v = load.verdict
    ax.axhline(v.threshold, color="grey", linestyle=":", label=f"HPA threshold {v.threshold:g} s")
    for name, at in (("earliest", v.earliest_s), ("latest", v.latest_s)):
        if at is not None:
            ax.axvline(load.load_start_s + at, color="tab:red", linestyle="--", alpha=0.6)
            ax.annotate(f"HPA scales ({name}): +{at:g} s", (load.load_start_s + at, v.threshold), fontsize=7)
    ax.set_xlabel("seconds")
    ax.set_ylabel("backlog (seconds of queued model work)")
    ax.set_title("Backlog of one replica under a load step (model: when an HPA would scale)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOT_CAPTIONS = {
    "knee": "**Latency against throughput**: p50 (left) and p99 (right) against the delivered texts/s, one "
    "line per server and loop (solid: closed, dashed: open), in order of offered load.",
    "throughput": "**Throughput against concurrency**: closed loop, with the raw limit for scale.",
    "latency": "**Latency distribution per step**: latency by percentile, the tail stretched out (90, 99, "
    "99.9, ...), one line per step (darker: lighter load).",
    "batch_sizes": "**Batches and padding per step**, from the server's metrics: the share of batches by "
    "size, and padded over real tokens.",
}


def write_plots(doc: Document, out_dir: Path, p99_target_ms: float | None = None) -> dict[str, str]:
    """Writes every plot the data allows; returns name -> file name (relative to out_dir)."""
    makers: dict[str, Callable[[Path], Path | None]] = {
        "knee": lambda p: plot_knee(doc, p, p99_target_ms),
        "throughput": lambda p: plot_throughput(doc, p),
        "latency": lambda p: plot_latency(doc, p),
        "batch_sizes": lambda p: plot_batch_sizes(doc, p),
    }
    written = {}
    for name, make in makers.items():
        if make(out_dir / f"{name}.png") is not None:
            written[name] = f"{name}.png"
    return written


# --- Markdown -----------------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _summary_value(item: SummaryItem) -> str:
    text = f"{_fmt(item.value, item.digits)}{item.unit}"
    if item.target is not None:
        verdict = "unknown against" if item.met is None else "meets" if item.met else "misses"
        text += f" ({verdict} the target {item.target})"
    return text


def _about(series: Series) -> str:
    """What the target said of itself, in a line."""
    info = series.server
    if isinstance(info, PeerInfo):
        named = [info.model_name or "model not named", info.server, f"dimension {info.dimension}"]
        details = [f"{k} {v}" for k, v in info.details.items()]
        return (
            f"Target `{series.target}` ({DESCRIPTIONS.get(info.protocol, info.protocol)}): "
            f"{', '.join(x for x in [*named, *details] if x)}."
        )
    return (
        f"Target `{series.target}`: {info.model_name} ({info.task}, {info.precision}, {info.provider}), "
        f"max batch {info.limits.max_batch_size}."
    )


def _series_lines(series: Series) -> list[str]:
    lines = [f"## {series.name.capitalize()}", "", _about(series), ""]
    for mode in ("closed", "open"):
        steps = [s for s in series.steps if s.mode == mode]
        if not steps:
            continue
        lines += [f"### {mode.capitalize()} loop", ""]
        lines += md_table(TABLE_HEADER, [step_row(s) for s in steps])
        lines.append("")
        behind = [s.label for s in steps if s.schedule and s.schedule.client_fell_behind]
        if behind:
            lines += [f"The client fell behind its schedule in: {', '.join(behind)} (see `schedule`).", ""]
        warm = [f"{s.label} {s.warmup.errors}" for s in steps if s.warmup.failed]
        if warm:
            lines += [f"Calls failed during warm-up (not in the figures): {'; '.join(warm)}.", ""]
    return lines


def markdown(doc: Document, plots: dict[str, str], plot_prefix: str) -> str:
    """The summary: headline figures, every step, the server's view, raw limit, machine, reproduction."""
    title = TITLES[doc.kind]
    lines = [
        f"# {title}",
        "",
        f"Measured {doc.created_at} with `recserve bench` (schema {doc.schema}).",
        "",
    ]
    if doc.summary:
        lines += ["## Summary", ""]
        rows = [[item.title, _summary_value(item), item.how] for item in doc.summary.values()]
        lines += md_table(["figure", "measured", "how"], rows)
        lines.append("")
    if doc.workload:
        w = doc.workload
        tok = w.tokens_per_text
        lines += [
            "## Workload",
            "",
            f"{w.description} (`{w.lengths}`, seed {w.seed}): {w.texts} distinct texts, "
            f"tokens per text mean {tok.mean}, p50 {tok.p50}, p90 {tok.p90}, {tok.min}..{tok.max}; "
            f"{w.texts_per_call} text(s) per Embed call; RPC mix {w.rpc}; vectors as {w.encoding}.",
            "",
        ]
    for series in doc.series:
        lines += _series_lines(series)
    for heading, body in (doc.sections or {}).items():
        lines += [f"## {heading}", "", *body, ""]
    if doc.raw:
        raw = doc.raw
        lat = raw.single.latency_ms
        lines += [
            "## Raw limit",
            "",
            f"In-process ONNX Runtime on the same model file (`{raw.model_file}`, {raw.precision}, "
            f"{raw.provider}, {raw.threads} threads), the same {raw.texts} texts in length-sorted "
            f"batches of {raw.batch_size}, tokenisation included: **{raw.texts_per_s:.1f} texts/s** "
            f"({raw.tokens_per_s:.0f} tokens/s, padding {raw.padding_ratio}, "
            f"median of {raw.repeats} passes, before the served sweep). "
            f"One text at a time: p50 {_fmt(lat.p50, 2)} ms, p99 {_fmt(lat.p99, 2)} ms.",
            "",
        ]
    if plots:
        lines += ["## Plots", ""]
        for name, file in plots.items():
            caption = PLOT_CAPTIONS.get(name)
            lines += [*([f"{caption}", ""] if caption else []), f"![{name}]({plot_prefix}{file})", ""]
    lines += ["## Machine and versions", ""]
    m = doc.machine
    start = list(m.load_average_start) if m.load_average_start is not None else None
    end = list(m.load_average_end) if m.load_average_end is not None else None
    lines += [
        f"- CPU: {m.cpu_model}, {m.cores} cores ({m.usable_cores} usable), {m.memory_gib} GiB; "
        f"{m.platform}; Python {m.python}; load average at start {start}, at end {end}",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in doc.versions.items()),
    ]
    for series in doc.series:
        info = series.server
        if isinstance(info, PeerInfo):
            sha256 = info.details.get(WEIGHTS_SHA256)
            weights = (
                f"weights sha256 `{sha256}`"
                if sha256
                else "(its weights cannot be checked over its protocol)"
            )
            lines.append(
                f"- {series.name}: {info.server or 'server not named'} at `{series.target}`, model "
                f"{info.model_name or 'not named'} {weights}"
            )
            continue
        lines.append(
            f"- {series.name}: server {info.server_version}, model weights sha256 `{info.weights_sha256}`"
        )
    lines += ["", "## Method", ""]
    lines += [
        "- Closed loop: N callers, each sends its next call when the previous one returns. Open loop: calls "
        "leave on a fixed or Poisson schedule and each latency runs from the *scheduled* send time, so "
        "queueing anywhere (server or client) is counted: no coordinated omission.",
        "- Each step: a warm-up, then measurement windows repeated until two consecutive windows agree on "
        "throughput within the tolerance, or the cap; figures are over the last two windows. Percentiles are "
        "exact over every successful call; throughput counts answers arriving inside the windows.",
        "- Server figures (batch size, padding, queue and inference shares) come from its Prometheus "
        "metrics, scraped at the start and end of the measurement.",
        "",
        "## Reproduce",
        "",
        "```sh",
        doc.command,
        "```",
    ]
    if doc.reproduce_hint:
        lines += ["", doc.reproduce_hint]
    for note in doc.notes:
        lines += ["", f"> Note: {note}"]
    return "\n".join(lines) + "\n"


def write_markdown(doc: Document, path: Path, plots: dict[str, str], plots_dir: Path) -> Path:
    """Writes the summary at `path`, linking the plots relative to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(plots_dir.resolve(), path.parent.resolve())
    prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
    path.write_text(markdown(doc, plots, prefix))
    return path


def publish(
    doc: Document, out_dir: Path, markdown_path: Path | None, p99_target_ms: float | None = None
) -> dict[str, Path]:
    """The end of a command: `finish`, `write_all`, and the tables and file names on the terminal."""
    doc = finish(doc)
    paths = write_all(doc, out_dir, markdown_path, p99_target_ms)
    print_tables(doc)
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def write_all(
    doc: Document, out_dir: Path, markdown_path: Path | None, p99_target_ms: float | None = None
) -> dict[str, Path]:
    """JSON, plots and Markdown under `out_dir` (Markdown at `markdown_path` if given); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(doc, out_dir, p99_target_ms)
    md_path = markdown_path or out_dir / "summary.md"
    paths = {
        "json": write_json(doc, out_dir / "results.json"),
        "markdown": write_markdown(doc, md_path, plots, out_dir),
    }
    paths.update({name: out_dir / file for name, file in plots.items()})
    return paths
