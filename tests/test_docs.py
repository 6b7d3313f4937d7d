"""The docs' tables that mirror code (settings, metrics) match the code, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from recserve.server.command import SETTINGS_BEGIN, SETTINGS_END, settings_markdown
from recserve.server.metrics import Metrics, Name

ROOT = Path(__file__).resolve().parent.parent
SERVING = ROOT / "docs" / "serving.md"
METRICS_BEGIN = "<!-- metrics:begin -->"
METRICS_END = "<!-- metrics:end -->"
METRICS_HEADER = ["| name | type | labels | what it measures |", "|---|---|---|---|"]


def _block(text: str, begin: str, end: str) -> str:
    assert text.count(begin) == 1 and text.count(end) == 1, f"docs/serving.md needs one {begin} ... {end}"
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def test_settings_table_is_generated_from_the_settings_class() -> None:
    documented = _block(SERVING.read_text(encoding="utf-8"), SETTINGS_BEGIN, SETTINGS_END)
    assert documented == settings_markdown().strip("\n"), (
        "docs/serving.md's settings table differs from ServerSettings (recserve/server/settings.py). "
        "Regenerate it with `make docs` "
        "(python -m recserve.server.command --settings-markdown --write docs/serving.md)."
    )


def _metric_rows() -> dict[str, str]:
    """One table row per family the server registers, keyed by the name a Prometheus query uses."""
    metrics = Metrics(CollectorRegistry())
    # NOTE: labels are read from the wrappers, since a labelled family with no child yet exposes no
    # samples; the registry's own collect() is still the authority on which families exist.
    wrappers = {
        family.name: wrapper
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
        for family in wrapper.describe()
    }
    rows = {}
    for family in metrics.registry.collect():
        assert family.name in wrappers, f"{family.name} is registered but is not an attribute of Metrics"
        # A counter's samples carry `_total`: that is the name to query.
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = ", ".join(f"`{label}`" for label in wrappers[family.name]._labelnames) or "none"
        rows[name] = f"| `{name}` | {family.type} | {labels} | {family.documentation} |"
    return rows


def test_metrics_table_matches_the_registered_families() -> None:
    expected = _metric_rows()
    lines = _block(SERVING.read_text(encoding="utf-8"), METRICS_BEGIN, METRICS_END).splitlines()
    assert lines[:2] == METRICS_HEADER
    documented = {line.split("`")[1]: line for line in lines[2:]}
    wrong = sorted(
        name for name in expected.keys() | documented.keys() if expected.get(name) != documented.get(name)
    )
    table = "\n".join([*METRICS_HEADER, *expected.values()])
    assert not wrong, (
        f"docs/serving.md's metrics table differs from recserve/server/metrics.py in {wrong}. "
        f"The rows the code registers (any order):\n{table}"
    )


def test_every_metric_name_constant_is_documented() -> None:
    families = {value for key, value in vars(Name).items() if key.isupper()}
    rows = _metric_rows()
    documented = {name.removesuffix("_total") for name in rows} | set(rows)
    assert families <= documented, f"not in the metrics table: {sorted(families - documented)}"


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _outside_code(text: str) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in _outside_code(path.read_text(encoding="utf-8")):
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_every_relative_link_and_anchor_resolves() -> None:
    broken = []
    for source in _markdown_files():
        for line in _outside_code(source.read_text(encoding="utf-8")):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue  # http(s), mailto: not checked offline
                path_part, _, anchor = target.partition("#")
                path = (source.parent / path_part).resolve() if path_part else source
                where = f"{source.relative_to(ROOT)} -> {target}"
                if not path.exists():
                    broken.append(f"{where}: no such file")
                elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                    broken.append(f"{where}: no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)
