"""Plots of a `postcopy bench --json` result (needs the `bench` extra: matplotlib).

    python -m postcopy.bench.plot RESULT.json pagein.png

Page-in rate by mode and vCPU count, the Python modes with the C limit's bar beside each.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from postcopy.bench.pagein import MODES


def pagein_png(result: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    py, lim = result["pagein"], result.get("limit", {})
    vs = sorted(py["ratio_exit_classic"], key=int)
    width = 0.38
    fig, axes = plt.subplots(1, len(vs), figsize=(4.2 * len(vs), 4), sharey=True, squeeze=False)
    for ax, v in zip(axes[0], vs):
        xs = range(len(MODES))
        ax.bar([x - width / 2 for x in xs], [py[m][v] / 1e3 for m in MODES], width, label="Python (postcopy)")
        if "exit" in lim:
            ax.bar([x + width / 2 for x in xs], [lim[m][v] / 1e3 for m in MODES], width, label="C limit", color="0.6")
        ax.set_xticks(list(xs), MODES)
        ax.set_title(f"{v} vCPU{'s' if v != '1' else ''}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("k pages/s (one page per fault)")
    axes[0][0].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"Demand page-in, local source, {py['mem_mib']} MiB guest, median of {py['repeat']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m postcopy.bench.plot RESULT.json OUT.png", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        pagein_png(json.load(f), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
