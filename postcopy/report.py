"""A migration report a person can look at: ``timeline.png`` (matplotlib, Agg) and a
self-contained ``report.html`` (inline CSS, the PNG as a data URI, tables of the figures), from
the report dict that ``migrate(..., timeline=True)`` returns (postcopy/observe/timeline.py)."""
from __future__ import annotations

import base64
import html
import io
import json
from bisect import bisect_left
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ARRIVALS_STACKED = ("eager", "zero", "demand", "readahead", "background")
COLORS = {"eager": "#6b6b6b", "zero": "#c7c7c7", "demand": "#d62728", "readahead": "#ff9896",
          "background": "#1f77b4", "source": "#7f7f7f", "destination": "#2ca02c"}
MARKS = (("pause", "source pause", "#d62728", "--"), ("resume", "resume here", "#2ca02c", "--"),
         ("complete", "all pages here", "#000000", ":"))
RATE_WINDOW_MS = 100.0  # guest progress rate: pages verified over this window
# "before" rate: the last 400 ms on the source (the demo's sweep ends about then: not workload)
BEFORE_WINDOW_MS = 400.0
PNG_DPI = 90


class ReportError(Exception):
    """The report cannot be rendered; the message says what it lacks."""


def write_report(out_dir: str | Path, report: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, timeline.png and report.html into ``out_dir`` (created if missing);
    returns their paths by name."""
    timeline = _timeline(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = render_png(report, timeline)
    paths = {"json": out / "report.json", "png": out / "timeline.png", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(report))
    paths["png"].write_bytes(png)
    paths["html"].write_text(render_html(report, png))
    return paths


def _timeline(report: dict[str, Any]) -> dict[str, Any]:
    timeline = report.get("timeline")
    if not isinstance(timeline, dict) or timeline.get("version") != 1:
        raise ReportError("the report has no timeline (version 1): run the migration with --report "
                          "(or migrate(..., timeline=True))")
    for key in ("marks_ms", "faults", "pages", "blocktime_ms", "progress"):
        if key not in timeline:
            raise ReportError(f"the report's timeline lacks {key!r}")
    return timeline


# -- figures computed from the timeline ----------------------------------------------------------
def rate_series(t_ms: Sequence[float], count: Sequence[int],
                window_ms: float = RATE_WINDOW_MS) -> tuple[list[float], list[float]]:
    """Pages per second over the trailing ``window_ms`` at each sample that has a full window."""
    times, rates = [], []
    j = 0
    for i in range(len(t_ms)):
        while j < i and t_ms[i] - t_ms[j + 1] >= window_ms:
            j += 1
        span = t_ms[i] - t_ms[j]
        if span >= window_ms:
            times.append(t_ms[i])
            rates.append((count[i] - count[j]) * 1e3 / span)
    return times, rates


def mean_rate(t_ms: Sequence[float], count: Sequence[int], start: float, end: float) -> float | None:
    """Mean pages per second between the samples nearest ``start`` and ``end``."""
    if not t_ms or end <= start:
        return None
    i = min(bisect_left(t_ms, start), len(t_ms) - 1)
    j = min(bisect_left(t_ms, end), len(t_ms) - 1)
    if t_ms[j] - t_ms[i] <= 0:
        return None
    return (count[j] - count[i]) * 1e3 / (t_ms[j] - t_ms[i])


def progress_rates(timeline: dict[str, Any]) -> dict[str, float | None]:
    """Guest pages verified per second: the last second on the source, from resume to every page
    present (post-copy), and after that, here."""
    marks = timeline["marks_ms"]
    src = timeline["progress"].get("source") or {}
    dst = timeline["progress"].get("destination") or {}
    resume, complete = marks.get("resume"), marks.get("complete")
    st, sv = src.get("t_ms", []), src.get("verified", [])
    dt, dv = dst.get("t_ms", []), dst.get("verified", [])
    return {
        "before": mean_rate(st, sv, -BEFORE_WINDOW_MS, 0.0) if st else None,
        "during": mean_rate(dt, dv, resume, complete) if resume is not None and complete is not None else None,
        "after": mean_rate(dt, dv, complete, dt[-1]) if complete is not None and dt else None,
    }


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# -- the picture ---------------------------------------------------------------------------------
def render_png(report: dict[str, Any], timeline: dict[str, Any] | None = None) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    tl = timeline if timeline is not None else _timeline(report)
    marks = dict(tl["marks_ms"], pause=0.0)
    fig = plt.figure(figsize=(13, 10), layout="constrained")
    grid = fig.add_gridspec(3, 2)
    title = (f"post-copy migration: {report.get('guest_mib', '?')} MiB, {tl['vcpus']} vCPU, fault mode "
             f"{tl['fault_mode']}; downtime {report.get('downtime_ms')} ms, all pages in {report.get('total_ms')} ms")
    fig.suptitle(title)
    _pages_panel(fig.add_subplot(grid[0, 0]), tl, marks)
    _faults_panel(fig.add_subplot(grid[0, 1]), tl, marks)
    _progress_panel(fig.add_subplot(grid[1, :]), tl, marks)
    _latency_panel(fig.add_subplot(grid[2, 0]), tl)
    _blocktime_panel(fig.add_subplot(grid[2, 1]), tl, marks)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)
    plt.close(fig)
    return buf.getvalue()


def _mark(ax: Any, marks: dict[str, float | None], legend: bool = True) -> None:
    for key, label, color, style in MARKS:
        t = marks.get(key)
        if t is not None:
            ax.axvline(t, color=color, linestyle=style, linewidth=1, label=label if legend else None)


def _pages_panel(ax: Any, tl: dict[str, Any], marks: dict[str, float | None]) -> None:
    pages = tl["pages"]
    t = pages["t_ms"]
    if t:
        ax.stackplot(t, *(pages[k] for k in ARRIVALS_STACKED), labels=ARRIVALS_STACKED,
                     colors=[COLORS[k] for k in ARRIVALS_STACKED], step="post")
    ax.axhline(tl["npages"], color="#000000", linewidth=0.5)
    _mark(ax, marks, legend=False)
    if t:
        # The vCPUs' own fetches are a sliver of the stack: their own scale, on the right.
        right = ax.twinx()
        for kind in ("demand", "readahead"):
            right.plot(t, pages[kind], color=COLORS[kind], linewidth=1.5, drawstyle="steps-post",
                       label=f"{kind} (right scale)")
        right.set_ylabel("demand / readahead pages")
        right.set_ylim(bottom=0)
        right.legend(loc="upper left", fontsize=8)
    ax.set_title("pages present here, by how they arrived")
    ax.set_xlabel("ms since the source paused the guest")
    ax.set_ylabel("pages")
    ax.set_ylim(0, tl["npages"] * 1.05)
    if marks.get("complete") is not None:
        ax.set_xlim(min(-5.0, t[0] if t else 0.0), marks["complete"] * 1.1 + 5)  # type: ignore[operator]
    ax.legend(loc="center right", fontsize=8)


def _faults_panel(ax: Any, tl: dict[str, Any], marks: dict[str, float | None]) -> None:
    faults = tl["faults"]
    t = [x / 1e3 for x in faults["t_us"]]
    if t:
        for vcpu in sorted(set(faults["vcpu"])):
            idx = [i for i, v in enumerate(faults["vcpu"]) if v == vcpu]
            ax.scatter([t[i] for i in idx], [max(faults["latency_us"][i], 0.1) for i in idx], s=4, alpha=0.6,
                       label=f"vCPU {vcpu}" if vcpu >= 0 else "other thread", rasterized=True)
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8, markerscale=3)
    else:
        ax.text(0.5, 0.5, "no faults", ha="center", va="center", transform=ax.transAxes)
    _mark(ax, marks, legend=False)
    ax.set_title(f"each fault: when, and how long its vCPU waited ({len(t)} faults)")
    ax.set_xlabel("ms since the source paused the guest")
    ax.set_ylabel("latency (us)")
    if marks.get("complete") is not None:
        ax.set_xlim(min(-5.0, t[0] if t else 0.0), marks["complete"] * 1.1 + 5)  # type: ignore[operator]


def _progress_panel(ax: Any, tl: dict[str, Any], marks: dict[str, float | None]) -> None:
    for side in ("source", "destination"):
        series = tl["progress"].get(side) or {}
        t, rate = rate_series(series.get("t_ms", []), series.get("verified", []))
        if t:
            ax.plot(t, rate, color=COLORS[side], label=f"guest on the {side}", drawstyle="steps-post")
    _mark(ax, marks)
    complete = marks.get("complete")
    if complete is not None:
        ax.axvspan(0, complete, color="#ffdd99", alpha=0.3, label="post-copy (pages still arriving)")
    if complete is not None:
        ax.set_xlim(left=-max(2 * BEFORE_WINDOW_MS, complete))
    ax.set_title(f"the guest's own progress: pages it verified per second ({RATE_WINDOW_MS:.0f} ms window)")
    ax.set_xlabel("ms since the source paused the guest")
    ax.set_ylabel("pages verified / s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize=8)


def _latency_panel(ax: Any, tl: dict[str, Any]) -> None:
    import numpy as np
    lat = [max(x, 0.1) for x in tl["faults"]["latency_us"]]
    if lat:
        lo, hi = min(lat), max(lat)
        bins = np.logspace(np.log10(lo), np.log10(hi * 1.01 if hi > lo else lo * 10), 40)
        ax.hist(lat, bins=bins, color=COLORS["demand"])
        ax.set_xscale("log")
        s = sorted(lat)
        for q, style in ((0.5, "-"), (0.99, "--")):
            ax.axvline(_percentile(s, q), color="#000000", linestyle=style, linewidth=1,
                       label=f"p{round(q * 100)} {_percentile(s, q):.0f} us")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no faults", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("fault latency (fault reaches the VMM -> vCPU goes on)")
    ax.set_xlabel("us (log)")
    ax.set_ylabel("faults")


def _blocktime_panel(ax: Any, tl: dict[str, Any], marks: dict[str, float | None]) -> None:
    blocktime = list(tl["blocktime_ms"])
    labels = [f"vCPU {i}" for i in range(len(blocktime))] + ["all at once"]
    values = blocktime + [tl.get("blocktime_all_ms", 0.0)]
    bars = ax.bar(labels, values, color=[COLORS["demand"]] * len(blocktime) + ["#9467bd"])
    resume, complete = marks.get("resume"), marks.get("complete")
    if resume is not None and complete is not None and complete > resume:
        span = complete - resume
        ax.axhline(span, color="#000000", linestyle=":", linewidth=1, label=f"post-copy phase {span:.0f} ms")
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.0f} ms ({100 * v / span:.0f}%)", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=8)
        ax.legend(fontsize=8)
    ax.set_title("blocktime: time each vCPU waited for pages")
    ax.set_ylabel("ms")


# -- the page ------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.ok{color:#2ca02c;font-weight:bold}.bad{color:#d62728;font-weight:bold}img{max-width:100%;border:1px solid #ddd}"""


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def render_html(report: dict[str, Any], png: bytes) -> str:
    tl = _timeline(report)
    verified = bool(report.get("verified"))
    rates = progress_rates(tl)
    lat = report.get("fault_latency_us") or {}
    before, during, after = rates["before"], rates["during"], rates["after"]
    summary = _table(("", ""), [
        ("fault mode", report.get("fault_mode")), ("guest", f"{report.get('guest_mib')} MiB, {tl['vcpus']} vCPU"),
        ("downtime (pause -> first KVM_RUN here)", f"{_fmt(report.get('downtime_ms'))} ms"),
        ("switchover (header request -> vCPUs started)", f"{_fmt(report.get('switchover_ms'))} ms"),
        ("total (pause -> every page here)", f"{_fmt(report.get('total_ms'))} ms"),
        ("page-in rate", f"{_fmt(report.get('pagein_rate'))} pages/s"),
        ("header", f"{_fmt(report.get('header_bytes'))} bytes, {_fmt(report.get('eager_pages'))} eager pages"),
        ("time zero", tl["clock"].replace("_", " ")),
    ])
    pages = report.get("pages", {})
    npages = max(sum(pages.values()), 1)
    page_rows = [(k, v, f"{100 * v / npages:.1f}%") for k, v in pages.items()]
    fault_rows = [(k, v) for k, v in (report.get("exit_kinds") or {}).items()]
    lat_rows = [(k, lat.get(k)) for k in ("count", "p50", "p90", "p99", "max")]
    block_rows = [(f"vCPU {i}", ms) for i, ms in enumerate(tl["blocktime_ms"])] + \
        [("all vCPUs at once", tl.get("blocktime_all_ms"))]
    def share(rate: float | None, of: float | None, name: str) -> str:
        return "" if not of or rate is None else f"{100 * rate / of:.0f}% of {name}"
    rate_rows = [(f"before (last {BEFORE_WINDOW_MS:.0f} ms on the source)", before, share(before, after, "after")),
                 ("during post-copy", during, f"{share(during, before, 'before')}; {share(during, after, 'after')}"),
                 ("after (every page here)", after, share(after, before, "before"))]
    g = report.get("guest") or {}
    img = base64.b64encode(png).decode()
    status = f'<span class="{"ok" if verified else "bad"}">{"verified" if verified else "NOT verified"}</span>'
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>post-copy migration report</title><style>{CSS}</style></head>
<body><h1>Post-copy migration: {status}</h1>
<p>The guest checked every page of its memory before the migration (on the source) and after it
(here): {html.escape(_fmt((g.get('before') or {}).get('swept_pages')))} and
{html.escape(_fmt((g.get('after') or {}).get('swept_pages')))} pages swept, guest errors
{html.escape(_fmt(report.get('guest_errors')))}.</p>
<img alt="migration timeline" src="data:image/png;base64,{img}">
<h2>Summary</h2>{summary}
<h2>Pages by how they arrived</h2>{_table(("arrival", "pages", "share"), page_rows)}
<h2>Faults by kind</h2>{_table(("kind", "faults"), fault_rows)}
<h2>Fault latency (us)</h2>{_table(("", "us"), lat_rows)}
<h2>Blocktime (time vCPUs waited for pages, ms)</h2>{_table(("", "ms"), block_rows)}
<h2>The guest's progress (pages verified per second)</h2>{_table(("phase", "pages/s", ""), rate_rows)}
</body></html>
"""
