"""Reports of a run, all written from its Document: a terminal table, the JSON (every number), a Markdown
summary, PNG plots."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TextIO

from recserve.benchmarks.results import (
    Document,
    Json,
    LoadStep,
    Machine,
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


def machine_info() -> Machine:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Machine(
        cpu_model=_cpu_model(),
        cores=os.cpu_count(),
        usable_cores=usable,
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


Kind = Literal["run", "suite", "overload", "soak", "fleet"]
TITLES: dict[Kind, str] = {
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
    if doc.kind in ("overload", "soak", "fleet"):  # their sections are their tables
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


def plot_knee(doc: Document, path: Path, p99_target_ms: float | None = None) -> Path | None:
    """Latency percentiles against delivered throughput, one curve per series and mode: the knee.

    Points are joined in order of offered load (callers or rate), so a server whose throughput falls back
    under overload shows it as a curve bending back.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for series in doc.series:
        for mode, marker in _MARKERS:
            steps = [s for s in _steps(series, mode) if s.measured.latency_ms.p50 is not None]
            if not steps:
                continue
            xs = [s.measured.texts_per_s for s in steps]
            p50 = [s.measured.latency_ms.p50 for s in steps]
            p99 = [s.measured.latency_ms.p99 for s in steps]
            for key, style, ys in (("p50", "-", p50), ("p99", "--", p99)):
                ax.plot(
                    xs,
                    ys,
                    style,
                    marker=marker,
                    label=f"{series.name}, {mode} loop, {key}",
                )
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if p99_target_ms:
        ax.axhline(p99_target_ms, color="grey", linestyle=":", label=f"{p99_target_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("delivered throughput (texts/s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title("Latency against throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
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


def plot_batch_sizes(doc: Document, path: Path, max_steps: int = 4) -> Path | None:
    """Share of batches per batch-size bucket, for a few steps (from the server's histogram)."""
    picked: list[tuple[str, StepResult, dict[str, int]]] = []
    for series in doc.series:
        with_hist = [s for s in series.steps if s.server and s.server.batches]
        # The lightest and the heaviest closed-loop step show what batching does; open loop if none.
        closed = sorted((s for s in with_hist if s.mode == "closed"), key=lambda s: s.offered) or with_hist
        if closed:
            ends = closed[:1] + closed[-1:] if len(closed) > 1 else closed
            picked.extend((series.name, s, s.server.batch_size_histogram) for s in ends if s.server)
    picked = picked[:max_steps]
    if not picked:
        return None
    plt = _pyplot()
    buckets = sorted({le for _, _, hist in picked for le in hist}, key=float)
    used = [b for b in buckets if any(hist.get(b) for _, _, hist in picked)]
    if used:  # no empty buckets beyond the largest batch seen
        buckets = buckets[: buckets.index(used[-1]) + 1]
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.8 / len(picked)
    for j, (name, step, hist) in enumerate(picked):
        total = sum(hist.values()) or 1
        ax.bar(
            [i + j * width for i in range(len(buckets))],
            [hist.get(b, 0) / total for b in buckets],
            width=width,
            label=f"{name}: {step.label}",
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(buckets))])
    ax.set_xticklabels(["<=" + (b if b == "+Inf" else f"{float(b):g}") for b in buckets], rotation=45)
    ax.set_xlabel("texts per batch")
    ax.set_ylabel("share of batches")
    ax.set_title("Batch sizes formed by the server")
    ax.legend(fontsize=8)
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


def write_plots(doc: Document, out_dir: Path, p99_target_ms: float | None = None) -> dict[str, str]:
    """Writes every plot the data allows; returns name -> file name (relative to out_dir)."""
    makers: dict[str, Callable[[Path], Path | None]] = {
        "knee": lambda p: plot_knee(doc, p, p99_target_ms),
        "throughput": lambda p: plot_throughput(doc, p),
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


def _series_lines(series: Series) -> list[str]:
    info = series.server
    lines = [
        f"## {series.name.capitalize()}",
        "",
        f"Target `{series.target}`: {info.model_name} ({info.task}, {info.precision}, {info.provider}), "
        f"max batch {info.limits.max_batch_size}.",
        "",
    ]
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
            lines += [f"![{name}]({plot_prefix}{file})", ""]
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
        lines.append(
            f"- {series.name}: server {series.server.server_version}, model weights sha256 "
            f"`{series.server.weights_sha256}`"
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
