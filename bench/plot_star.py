#!/usr/bin/env python3
"""Plots Star phase-1 speedups over the best dense SDPA prefill from one GPU job's outputs:
star_bench.json (kvplug star, FlexAttention, FLOP-ideal) and star_peers.log (the reference code's
way: concat + flash, from ../shared/tools/star-peers.py in the same job).
Usage: python3 bench/plot_star.py RESULTS_DIR OUT.png"""
import json
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    d, png = sys.argv[1], sys.argv[2]
    rows = json.load(open(f"{d}/star_bench.json"))["phase1"]
    paper = {}
    for line in open(f"{d}/star_peers.log"):
        m = re.match(r"S=(\d+) blk=(\d+):.*paper-style flash [\d.nan]+ ms \(([\d.nan]+)x\)", line)
        if m:
            paper[(int(m.group(1)), int(m.group(2)))] = float(m.group(3))
    labels = [f"{r['S'] // 1024}k / {r['block'] // 1024}k" for r in rows]
    series = [("kvplug star (paged)", [r["speedup_star"] for r in rows]),
              ("FlexAttention", [r["speedup_flex"] for r in rows]),
              ("concat + flash (reference code)", [paper.get((r["S"], r["block"]), float("nan")) for r in rows]),
              ("FLOP-ideal", [r["flop_ideal"] for r in rows]),
              ("target: 0.87 x FLOP-ideal", [0.87 * r["flop_ideal"] for r in rows])]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.16
    for i, (name, ys) in enumerate(series):
        ax.bar([x + (i - 2) * w for x in range(len(rows))], ys, w, label=name)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("context / block (anchor = block)")
    ax.set_ylabel("speedup over the best dense SDPA prefill")
    ax.set_title("Star phase 1 on an H200, GQA 32/8, head 128, bf16 (one job)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
