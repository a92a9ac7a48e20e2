"""Mean FROC curves (sensitivity vs false positives per scan) of detection study runs.

Each ``--arm LABEL=GLOB`` names a set of runs (one per seed) whose ``eval/metrics.json`` were
written by ``evaluate.json`` (or the segmentation baseline's ``metrics_t*.json``); the figure
shows the mean over the runs with the min-max band.

    python benchmarks/plot_froc.py --out docs/images/detection_froc.png \\
        --arm "scratch=runs/detstudy/fpn1/scratch_s*/eval/metrics.json" ...
"""

from __future__ import annotations

import argparse
import glob
import json

RATES = (0.125, 0.25, 0.5, 1, 2, 4, 8)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", action="append", required=True, metavar="LABEL=GLOB")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for arm in args.arm:
        label, pattern = arm.split("=", 1)
        files = sorted(glob.glob(pattern))
        if not files:
            raise SystemExit(f"{pattern}: no metrics files")
        curves = np.array([[json.load(open(f))["overall"][f"sens@{r:g}"] for r in RATES]
                           for f in files])  # fmt: skip
        mean = curves.mean(0)
        line = ax.plot(RATES, mean, marker="o", label=f"{label} (n={len(files)})")[0]
        ax.fill_between(RATES, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(RATES, [f"{r:g}" for r in RATES])
    ax.set_ylim(0, 1)
    ax.axhline(0.9, color="grey", ls=":", lw=1)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity (IoU > 0.1)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
