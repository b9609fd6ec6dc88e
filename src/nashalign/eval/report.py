"""Markdown and HTML reports with PNG plots for alignment runs.

A report is built from plain data, so any loop (online INPO, the demo, `nashalign eval`) can write one:

- `series`: algorithm name -> list of per-iteration metric dicts, e.g.
  `{"inpo": [{"iteration": 0, "duality_gap": 0.31, "win_rate": 0.5, ...}, ...]}`;
- `loss_curves`: algorithm name -> list of (global step, loss) from training;
- `samples`: rows of example responses, each a dict with at least `algorithm`, `iteration`, `prompt`,
  `response`.

The HTML is written by hand (a few headings, tables and images) instead of pulling in a templating
or Markdown library: the content is fixed and every string is escaped with `html.escape`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nashalign.data.artifacts import atomic_write_text

# Metrics plotted against iteration when present, with their axis labels and whether a log scale fits.
PLOTTED_METRICS = {
    "duality_gap": ("exact duality gap", True),
    "unregularized_gap": ("unregularized duality gap DG₀", True),
    "win_rate": ("win rate", False),
    "win_rate_vs_ref": ("win rate against the reference policy", False),
    "mean_length": ("mean response length (tokens)", False),
    "kl": ("KL(π ‖ π_ref), nats", False),
}


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    html: Path
    plots: tuple[Path, ...]


def _finite(values: Sequence[float]) -> bool:
    return any(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _save_line_plot(
    lines: Mapping[str, Sequence[tuple[float, float]]], path: Path, *, xlabel: str, ylabel: str,
    marker: str | None = None, log_scale: bool = False,
) -> Path:
    """A PNG at `path` with one line of (x, y) points per name, a grid and a legend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in lines.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=marker, label=name)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metric(series: Mapping[str, Sequence[Mapping]], metric: str, path: Path) -> Path | None:
    """Plot `metric` against iteration, one line per algorithm; None when no algorithm has it."""
    label, log_scale = PLOTTED_METRICS.get(metric, (metric, False))
    lines = {}
    for name, rows in series.items():
        points = [(row.get("iteration", i), row[metric]) for i, row in enumerate(rows) if metric in row]
        points = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
        if points:
            lines[name] = points
    if not lines:
        return None
    log_scale = log_scale and all(y > 0 for pts in lines.values() for _, y in pts)
    return _save_line_plot(lines, path, xlabel="iteration", ylabel=label, marker="o", log_scale=log_scale)


def plot_loss_curves(loss_curves: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path | None:
    """Training loss against global step, one line per algorithm; None when there is no data."""
    curves = {name: pts for name, pts in loss_curves.items() if pts and _finite([y for _, y in pts])}
    if not curves:
        return None
    return _save_line_plot(curves, path, xlabel="optimizer step", ylabel="training loss")


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metric_table(series: Mapping[str, Sequence[Mapping]]) -> tuple[list[str], list[list[str]]]:
    keys: list[str] = []
    for rows in series.values():
        for row in rows:
            keys.extend(k for k in row if k not in keys and k not in ("algorithm", "iteration"))
    header = ["algorithm", "iteration", *keys]
    body = []
    for name, rows in series.items():
        for i, row in enumerate(rows):
            body.append([name, _format(row.get("iteration", i)), *(_format(row.get(k, "")) for k in keys)])
    return header, body


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def write_report(
    directory: str | Path,
    *,
    title: str,
    series: Mapping[str, Sequence[Mapping]],
    loss_curves: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    samples: Sequence[Mapping] = (),
    notes: Sequence[str] = (),
    max_samples: int = 30,
) -> ReportPaths:
    """Write `report.md`, `report.html` and PNG plots into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    for metric in PLOTTED_METRICS:
        made = plot_metric(series, metric, directory / f"{metric}.png")
        if made:
            plots.append(made)
    if loss_curves:
        made = plot_loss_curves(loss_curves, directory / "training_loss.png")
        if made:
            plots.append(made)

    header, body = _metric_table(series)
    sample_header = ["algorithm", "iteration", "prompt", "response"]
    sample_body = [[_format(s.get(k, "")) for k in sample_header] for s in list(samples)[:max_samples]]

    md = [f"# {title}", ""]
    md += [f"- {note}" for note in notes] + ([""] if notes else [])
    md += ["## Metrics per iteration", "", _markdown_table(header, body), "", "## Plots", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots] or ["(no plottable metrics)"]
    if sample_body:
        md += ["", "## Sample responses", "", _markdown_table(sample_header, sample_body)]
    md_path = directory / "report.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")

    images = "".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">'
        f"<figcaption>{html.escape(p.stem)}</figcaption></figure>"
        for p in plots
    )
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 6px}"
        "figure{display:inline-block;margin:0.5em}img{max-width:520px}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        + (f"<ul>{note_items}</ul>" if note_items else "")
        + f"<h2>Metrics per iteration</h2>{_html_table(header, body)}"
        + f"<h2>Plots</h2>{images or '<p>(no plottable metrics)</p>'}"
        + (f"<h2>Sample responses</h2>{_html_table(sample_header, sample_body)}" if sample_body else "")
        + "</body></html>"
    )
    html_path = directory / "report.html"
    atomic_write_text(html_path, page)
    return ReportPaths(markdown=md_path, html=html_path, plots=tuple(plots))
