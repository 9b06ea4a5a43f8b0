"""The report's arithmetic and rendering, from a timeline made up here (no guest needed)."""
from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from postcopy.report import ReportError, mean_rate, progress_rates, rate_series, render_png, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _report() -> dict[str, Any]:
    t = [float(x) for x in range(0, 400, 10)]
    timeline = {
        "version": 1, "clock": "source_pause", "fault_mode": "exit", "vcpus": 2, "npages": 1000,
        "marks_ms": {"switchover_request": -1.0, "resume": 5.0, "complete": 300.0},
        "faults": {"kinds": ["mmio", "fetch", "memory_fault", "sigbus", "uffd"], "t_us": [6000, 9000, 50000],
                   "vcpu": [0, 1, 0], "kind": [0, 1, 0], "latency_us": [120.0, 800.5, 40.0]},
        "pages": {"t_ms": t, "eager": [8] * len(t), "zero": [100] * len(t),
                  "demand": [min(3, i) for i in range(len(t))], "readahead": [min(12, 4 * i) for i in range(len(t))],
                  "background": [min(877, 30 * i) for i in range(len(t))]},
        "blocktime_ms": [0.16, 0.8], "blocktime_all_ms": 0.0,
        "progress": {"source": {"t_ms": [-400.0, -200.0, 0.0], "verified": [0, 1000, 2000]},
                     "destination": {"t_ms": t, "verified": [2000 + 5 * int(x) for x in t]}},
    }
    return {"fault_mode": "exit", "guest_mib": 4, "vcpus": 2, "downtime_ms": 5.0, "switchover_ms": 6.0,
            "total_ms": 300.0, "pagein_rate": 3000.0, "header_bytes": 4096, "eager_pages": 8,
            "pages": {"eager": 8, "demand": 3, "readahead": 12, "background": 877, "zero": 100},
            "exit_kinds": {"mmio": 2, "fetch": 1, "memory_fault": 0, "sigbus": 0},
            "fault_latency_us": {"count": 3, "p50": 120.0}, "verified": True, "guest_errors": 0,
            "guest": {"before": {"swept_pages": 1000}, "after": {"swept_pages": 1000}}, "timeline": timeline}


def test_rates_are_pages_per_second_over_their_window() -> None:
    t, v = [0.0, 50.0, 100.0, 150.0, 200.0], [0, 100, 200, 300, 500]
    assert rate_series(t, v, window_ms=100.0) == ([100.0, 150.0, 200.0], [2000.0, 2000.0, 3000.0])
    assert mean_rate(t, v, 0.0, 200.0) == 2500.0
    assert mean_rate(t, v, 100.0, 100.0) is None and mean_rate([], [], 0.0, 1.0) is None
    rates = progress_rates(_report()["timeline"])
    assert rates["before"] == pytest.approx(5000.0)  # 2000 pages over the last 400 ms on the source
    assert rates["during"] == pytest.approx(5000.0) and rates["after"] == pytest.approx(5000.0)


def test_write_report_writes_a_png_and_a_page_that_embeds_it(tmp_path: Path) -> None:
    report = _report()
    paths = write_report(tmp_path / "out", report)
    png = paths["png"].read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) < 400_000
    page = paths["html"].read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert "<script" not in page and "http" not in page  # self-contained: nothing to fetch
    assert json.loads(paths["json"].read_text()) == report


def test_a_migration_without_faults_still_renders() -> None:
    report = _report()
    report["timeline"]["faults"] = {k: ([] if k != "kinds" else v) for k, v in report["timeline"]["faults"].items()}
    report["timeline"]["progress"]["source"] = None  # a source without GET /v1/vm/progress
    assert render_png(report).startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("breakage", ["no timeline", "old version", "no pages"])
def test_a_report_without_a_usable_timeline_is_refused_and_nothing_written(tmp_path: Path, breakage: str) -> None:
    report = copy.deepcopy(_report())
    if breakage == "no timeline":
        del report["timeline"]
    elif breakage == "old version":
        report["timeline"]["version"] = 0
    else:
        del report["timeline"]["pages"]
    with pytest.raises(ReportError, match="timeline"):
        write_report(tmp_path / "out", report)
    assert not (tmp_path / "out").exists()
