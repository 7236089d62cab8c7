"""Attention-entropy telemetry (entropy-guided attention, arXiv 2501.03489) over a serving run.

Every layer whose backend supports entropy (``dense``, ``star``, ``entropy``) writes the per-head
summary of its run (``Attention.run(..., entropy_summary=)``: rows, mean entropy H, informative rows
with >= 2 keys, their mean H / E_max with E_max = log(keys seen), rows in the collapse band
H <= E_max / 4 and in the overload band H >= 3 E_max / 4) into its slice of one [layers, heads, 6]
step buffer on the run's device. After each step the buffer is folded into a float64 accumulator on
the same device, means weighted by their row counts, with a few tensor ops: nothing waits for the
device until :meth:`EntropyTelemetry.report` reads the accumulator once, at the end.

A head's band is that of its mean normalised entropy: collapse in [0, 1/4], overload in [3/4, 1].
:func:`format_table` prints the per-layer, per-head table and :func:`write_heatmap` the layer x
head heat map (matplotlib, optional: :class:`MatplotlibMissing` says how to get it).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

import kvplug

#: Mean normalised entropy at or below which a head is in entropic collapse.
COLLAPSE_MAX = 0.25
#: Mean normalised entropy at or above which a head is in entropic overload.
OVERLOAD_MIN = 0.75


class MatplotlibMissing(RuntimeError):
    """The heat map needs matplotlib, which is not installed."""


def band(mean_normalized: float, informative_rows: float) -> str:
    """"collapse", "overload" or "" for a head's mean normalised entropy ("" without informative rows)."""
    if informative_rows <= 0:
        return ""
    if mean_normalized <= COLLAPSE_MAX:
        return "collapse"
    if mean_normalized >= OVERLOAD_MIN:
        return "overload"
    return ""


class EntropyTelemetry:
    """The engine's accumulator: ``step_buffer[layer]`` is the summary tensor that layer's run writes;
    :meth:`end_step` folds a step in. ``layers`` lists the layers that report (their backends
    support entropy); the others stay zero."""

    def __init__(self, num_layers: int, num_heads: int, layers: Sequence[int], backends: Sequence[str],
                 device: torch.device) -> None:
        self.num_layers, self.num_heads = num_layers, num_heads
        self.layers = tuple(layers)
        self.backends = tuple(backends)
        self.step_buffer = torch.zeros(num_layers, num_heads, 6, dtype=torch.float32, device=device)
        # Sums: rows, rows * mean H, informative rows, informative * mean H/E_max, collapse, overload.
        self._acc = torch.zeros(num_layers, num_heads, 6, dtype=torch.float64, device=device)
        self._weights = torch.zeros(6, dtype=torch.float64, device=device)
        self.num_steps = 0

    def end_step(self) -> None:
        """Fold the step buffer into the accumulator (launched on the device, no sync)."""
        s = self.step_buffer.to(torch.float64)
        s[..., 1] *= s[..., 0]
        s[..., 3] *= s[..., 2]
        self._acc += s
        self.num_steps += 1

    def combined(self) -> np.ndarray:
        """[layers, heads, 6] float64 over the whole run, in the summary's columns (means weighted by
        row counts; 0 over no rows). Reads the device once."""
        acc = self._acc.cpu().numpy()
        out = acc.copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            out[..., 1] = np.where(acc[..., 0] > 0, acc[..., 1] / acc[..., 0], 0.0)
            out[..., 3] = np.where(acc[..., 2] > 0, acc[..., 3] / acc[..., 2], 0.0)
        return out

    def report(self) -> Dict[str, Any]:
        """JSON-ready: per layer its backend, whether it reports, the rows-weighted layer means and
        one entry per head (the summary's fields and the head's band)."""
        c = self.combined()
        layers: List[Dict[str, Any]] = []
        for i in range(self.num_layers):
            reported = i in self.layers
            heads = []
            for h in range(self.num_heads):
                rows, mh, inf, mn, col, ovl = (float(x) for x in c[i, h])
                heads.append({"rows": int(rows), "mean_entropy": mh, "informative_rows": int(inf),
                              "mean_normalized_entropy": mn, "collapse_rows": int(col), "overload_rows": int(ovl),
                              "band": band(mn, inf) if reported else ""})
            rows = c[i, :, 0].sum()
            inf = c[i, :, 2].sum()
            layers.append({
                "layer": i, "backend": self.backends[i], "reported": reported, "rows": int(rows),
                "mean_entropy": float((c[i, :, 0] * c[i, :, 1]).sum() / rows) if rows else None,
                "mean_normalized_entropy": float((c[i, :, 2] * c[i, :, 3]).sum() / inf) if inf else None,
                "collapse_heads": sum(x["band"] == "collapse" for x in heads),
                "overload_heads": sum(x["band"] == "overload" for x in heads),
                "heads": heads})
        return {"fields": list(kvplug.ENTROPY_SUMMARY_FIELDS), "num_steps": self.num_steps,
                "bands": {"collapse": [0.0, COLLAPSE_MAX], "overload": [OVERLOAD_MIN, 1.0]},
                "collapse_heads": sum(x["collapse_heads"] for x in layers),
                "overload_heads": sum(x["overload_heads"] for x in layers),
                "layers": layers}


def summary_line(report: Dict[str, Any]) -> str:
    """One line for the serving report: per-layer mean H and H/E_max, heads in each band."""
    def fmt(x: Optional[float], spec: str) -> str:
        return "-" if x is None else format(x, spec)

    layers = report["layers"]
    reported = [x for x in layers if x["reported"]]
    return (f"{len(reported)} of {len(layers)} layers; mean H per layer (nats) "
            f"[{', '.join(fmt(x['mean_entropy'], '.3f') for x in layers)}], H/E_max "
            f"[{', '.join(fmt(x['mean_normalized_entropy'], '.3f') for x in layers)}]; heads in collapse "
            f"{report['collapse_heads']}, in overload {report['overload_heads']}")


def format_table(report: Dict[str, Any]) -> str:
    """The per-layer, per-head table: rows, mean entropy, mean normalised entropy, band rows, band."""
    head = (f"  {'layer':>5} {'backend':<8} {'head':>4} {'rows':>8} {'mean H':>8} {'H/E_max':>8} "
            f"{'collapse':>9} {'overload':>9}  band")
    lines = ["attention entropy (per layer and head; H in nats, E_max = log(keys seen); bands of the mean "
             f"H/E_max: collapse <= {COLLAPSE_MAX}, overload >= {OVERLOAD_MIN})", head]
    for layer in report["layers"]:
        if not layer["reported"]:
            lines.append(f"  {layer['layer']:>5} {layer['backend']:<8}    -  (backend without entropy telemetry)")
            continue
        for h, x in enumerate(layer["heads"]):
            lines.append(f"  {layer['layer']:>5} {layer['backend']:<8} {h:>4} {x['rows']:>8} "
                         f"{x['mean_entropy']:>8.4f} {x['mean_normalized_entropy']:>8.4f} "
                         f"{x['collapse_rows']:>9} {x['overload_rows']:>9}  {x['band']}")
    return "\n".join(lines)


def check_matplotlib() -> None:
    """Raise :class:`MatplotlibMissing` (with the fix) unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MatplotlibMissing("the entropy heat map needs matplotlib, which this Python lacks: "
                                "pip install matplotlib (or leave out --entropy-png; the table needs nothing)") from e


def write_heatmap(report: Dict[str, Any], path: str, title: Optional[str] = None) -> None:
    """A layer x head heat map of the mean normalised entropy H/E_max in [0, 1] (viridis), each cell
    labelled with its value; heads in the collapse band hatched '//' and outlined in white, in the
    overload band hatched '\\\\' and outlined in red; layers without telemetry greyed out. PNG (or
    whatever the extension names)."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    layers = report["layers"]
    num_layers, num_heads = len(layers), len(layers[0]["heads"]) if layers else 0
    grid = np.full((num_layers, num_heads), np.nan)
    for i, layer in enumerate(layers):
        if layer["reported"]:
            for h, x in enumerate(layer["heads"]):
                if x["informative_rows"] > 0:
                    grid[i, h] = x["mean_normalized_entropy"]
    width = min(12.0, 2.2 + 0.75 * num_heads)
    height = min(10.0, 1.6 + 0.45 * num_layers)
    with matplotlib.rc_context({"hatch.linewidth": 0.6}):  # thin hatches: the values stay readable
        fig, ax = plt.subplots(figsize=(width, height), dpi=100)
        cmap = matplotlib.colormaps["viridis"].copy()
        cmap.set_bad("#d0d0d0")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                       interpolation="nearest")
        for i, layer in enumerate(layers):
            for h, x in enumerate(layer["heads"]):
                v = grid[i, h]
                if math.isnan(v):
                    ax.text(h, i, "n/a", ha="center", va="center", fontsize=7, color="#555555")
                    continue
                if x["band"] == "collapse":
                    ax.add_patch(Rectangle((h - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="white", lw=2))
                elif x["band"] == "overload":
                    ax.add_patch(Rectangle((h - 0.5, i - 0.5), 1, 1, fill=False, hatch="\\\\", edgecolor="red", lw=2))
                ax.text(h, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black",
                        bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8))
        ax.set_xticks(range(num_heads))
        ax.set_xticklabels([str(h) for h in range(num_heads)], fontsize=8)
        ax.set_yticks(range(num_layers))
        ax.set_yticklabels([f"{x['layer']} {x['backend']}" for x in layers], fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title or "mean normalised attention entropy H / log(keys)", fontsize=9)
        cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        cb.ax.axhspan(0.0, COLLAPSE_MAX, facecolor="none", hatch="//", edgecolor="white")
        cb.ax.axhspan(OVERLOAD_MIN, 1.0, facecolor="none", hatch="\\\\", edgecolor="red")
        cb.ax.tick_params(labelsize=7)
        ax.legend(handles=[Patch(facecolor="none", hatch="//", edgecolor="black", label=f"collapse <= {COLLAPSE_MAX}"),
                           Patch(facecolor="none", hatch="\\\\", edgecolor="red", label=f"overload >= {OVERLOAD_MIN}")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.18 if num_layers > 3 else -0.3), ncol=2, fontsize=7,
                  frameon=False)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
