"""Figures of the report, drawn from the analysis DataFrames.

Every function takes DataFrames (``devicediff.analysis.curves``, ``stats.verdict_table``) and
returns PNG bytes, or ``None`` when there is nothing to draw. Matplotlib's object API with the
Agg canvas only: no pyplot, so no global figure state leaks between studies or tests.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

DPI = 100
REF_COLOR = "#222222"
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]
VERDICT_COLORS = {"equivalent": "#2e7d32", "differs": "#c62828", "inconclusive": "#ef8f00"}


def colors_for(order: list[str], reference: str) -> dict[str, str]:
    """One colour per config, stable across every figure of a study; the reference is black."""
    out, i = {}, 0
    for c in order:
        if c == reference:
            out[c] = REF_COLOR
        else:
            out[c] = PALETTE[i % len(PALETTE)]
            i += 1
    return out


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _style(ax) -> None:
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)


def forest_plot(verdicts: pd.DataFrame, metrics: list[str], order: list[str], max_metrics: int = 4) -> bytes | None:
    """Relative difference to the reference (%) with its 95% CI: one row per config, one panel per
    metric (headline first), over the grey equivalence region (+-margin); colour by verdict.
    The figure to read first."""
    if verdicts is None or verdicts.empty:
        return None
    v = verdicts[verdicts["metric"].isin(metrics[:max_metrics])].copy()
    v = v[np.isfinite(v["mean_ref"].astype(float)) & (v["mean_ref"].astype(float) != 0)]
    if v.empty:
        return None
    scale = 100.0 / v["mean_ref"].abs().astype(float)
    v["x"], v["lo"], v["hi"], v["m"] = v["diff"] * scale, v["ci_low"] * scale, v["ci_high"] * scale, v["margin"] * scale
    mets = [m for m in metrics if m in set(v["metric"])]
    cfgs = [c for c in order if c in set(v["config"])] + sorted(set(v["config"]) - set(order))
    ref = v["reference"].iloc[0]
    n = len(cfgs)
    label_w = min(3.2, 0.3 + 0.075 * max(len(str(c)) for c in cfgs))
    # Fixed parts in inches, so one config or twenty lay out the same way.
    top_in, rows_in, bottom_in = 0.75, max(0.8, 0.36 * n), 0.85
    width, height = label_w + 2.6 * len(mets), top_in + rows_in + bottom_in
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, len(mets), sharey=True, squeeze=False)[0]
    ys = {c: float(n - 1 - i) for i, c in enumerate(cfgs)}
    for ax, met in zip(axes, mets):
        g = v[v["metric"] == met]
        for _, r in g.iterrows():
            y = ys[r["config"]]
            if np.isfinite(r["m"]):
                ax.fill_betweenx([y - 0.36, y + 0.36], -r["m"], r["m"], color="#dddddd", linewidth=0, zorder=1)
            col = VERDICT_COLORS.get(r["verdict"], "#555555")
            if np.isfinite(r["lo"]) and np.isfinite(r["hi"]):
                ax.plot([r["lo"], r["hi"]], [y, y], color=col, linewidth=2.4, solid_capstyle="butt", zorder=3)
            ax.plot([r["x"]], [y], "o", color=col, markersize=6.5, zorder=4)
        ax.axvline(0, color=REF_COLOR, linewidth=1, zorder=2)
        lim = np.nanmax(np.abs(np.concatenate([g["lo"], g["hi"], g["m"], g["x"]]).astype(float)))
        lim = 1.0 if not np.isfinite(lim) or lim == 0 else lim * 1.15
        ax.set_xlim(-lim, lim)
        ax.set_title(met, fontsize=9.5)
        _style(ax)
        ax.grid(False, axis="y")
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("% vs reference", fontsize=8.5)
    axes[0].set_yticks([ys[c] for c in cfgs])
    axes[0].set_yticklabels(cfgs, fontsize=9)
    axes[0].set_ylim(-0.7, n - 0.3)
    handles = [Patch(color="#dddddd", label="equivalence margin (±)")] + [
        Line2D([], [], color=c, marker="o", label=k) for k, c in VERDICT_COLORS.items()]
    fig.legend(handles=handles, fontsize=8, loc="upper center", ncol=4, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.02 / height))
    fig.suptitle(f"difference to {ref} (dot: mean over seeds, bar: 95% CI)", fontsize=9.5, y=0.06 / height,
                 va="bottom")
    fig.subplots_adjust(left=label_w / width, right=1 - 0.2 / width, top=1 - top_in / height,
                        bottom=bottom_in / height, wspace=0.28)
    return _png(fig)


def curve_plot(mean: pd.DataFrame, diff: pd.DataFrame, metric: str, reference: str, order: list[str],
               colors: dict[str, str]) -> bytes | None:
    """Top: mean of ``metric`` over seeds per config with its 95% band. Bottom: config minus
    reference in % of the reference mean (paired by seed), with the reference's seed-to-seed sd
    in grey for scale."""
    if mean is None or mean.empty:
        return None
    has_diff = diff is not None and not diff.empty and np.isfinite(diff["rel_diff"].astype(float)).any()
    fig = Figure(figsize=(9.0, 6.2 if has_diff else 3.6))
    if has_diff:
        ax, bx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.5, 1]})
    else:
        ax, bx = fig.add_subplot(111), None
    for cfg in order:
        g = mean[mean["config"] == cfg]
        if g.empty:
            continue
        c = colors.get(cfg, "#555555")
        lw = 4.0 if cfg == reference else 1.6  # wide, drawn below: still visible under an identical config
        label = f"{cfg} (reference)" if cfg == reference else cfg
        marker = "o" if len(g) <= 25 else None
        ax.plot(g["step"], g["mean"], color=c, linewidth=lw, label=label, marker=marker,
                markersize=5 if cfg == reference else 3.5, alpha=0.75 if cfg == reference else 1.0,
                zorder=3 if cfg == reference else 4)
        ax.fill_between(g["step"], g["lo"], g["hi"], color=c, alpha=0.15, linewidth=0)
    n = int(mean["n"].max()) if len(mean) else 0
    ax.set_title(f"{metric}: mean over {n} seed{'s' if n != 1 else ''}, band = 95% CI of the mean", fontsize=10,
                 loc="left")
    ax.set_ylabel(metric, fontsize=9)
    _style(ax)
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    if bx is not None:
        r = mean[mean["config"] == reference].set_index("step")
        sd = (100 * r["sd"] / r["mean"].abs()).replace([np.inf, -np.inf], np.nan)
        if sd.notna().any():
            bx.fill_between(sd.index, -sd, sd, color="#cccccc", alpha=0.6, linewidth=0,
                            label=f"±1 sd of {reference} across seeds")
        for cfg in order:
            g = diff[diff["config"] == cfg]
            if g.empty:
                continue
            c = colors.get(cfg, "#555555")
            bx.plot(g["step"], 100 * g["rel_diff"], color=c, linewidth=1.6, label=cfg,
                    marker="o" if len(g) <= 25 else None, markersize=3.5)
            bx.fill_between(g["step"], 100 * g["rel_lo"], 100 * g["rel_hi"], color=c, alpha=0.2, linewidth=0)
        bx.axhline(0, color=REF_COLOR, linewidth=1)
        paired = bool(diff["paired"].all())
        bx.set_title(f"config − {reference}, % of the reference mean"
                     f" ({'paired by seed' if paired else 'difference of means'}; band = 95% CI)",
                     fontsize=10, loc="left")
        bx.set_ylabel("difference (%)", fontsize=9)
        bx.set_xlabel("training step", fontsize=9)
        _style(bx)
        bx.legend(fontsize=8, frameon=False, loc="upper right")
    else:
        ax.set_xlabel("training step", fontsize=9)
    # fixed margins in inches (tight_layout costs more than drawing the figure)
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.85 / 9.0, right=1 - 0.2 / 9.0, top=1 - 0.35 / h, bottom=0.55 / h, hspace=0.7 / (h / 2))
    return _png(fig)


def weight_plot(wd: pd.DataFrame, reference: str, order: list[str], colors: dict[str, str]) -> bytes | None:
    """Relative L2 distance of the weights to the reference run of the same seed, log scale, one
    thin line per seed and a thick median per config. Bitwise-equal points (distance 0) sit on a
    marked floor; where only hashes are known, a strip of equal/unequal marks."""
    if wd is None or wd.empty:
        return None
    rel = wd["rel"].astype(float)
    known = rel[np.isfinite(rel) & (rel > 0)]
    cfgs = [c for c in order if c in set(wd["config"])]
    fig = Figure(figsize=(9.0, 3.9 if not known.empty else 1.5 + 0.4 * len(cfgs)))
    ax = fig.add_subplot(111)
    if known.empty:
        # hashes only: a strip per config, one mark per (seed, step)
        labelled = set()
        for i, cfg in enumerate(cfgs):
            g = wd[wd["config"] == cfg]
            eq = g[g["equal"].astype(bool)]
            ne = g[~g["equal"].astype(bool)]
            if len(eq):
                ax.plot(eq["step"], np.full(len(eq), i), "o", color="#2e7d32", markersize=7,
                        label=None if "eq" in labelled else "bitwise equal")
                labelled.add("eq")
            if len(ne):
                ax.plot(ne["step"], np.full(len(ne), i), "x", color="#c62828", markersize=8, mew=2,
                        label=None if "ne" in labelled else "bits differ (no snapshot to measure by how much)")
                labelled.add("ne")
        ax.set_yticks(range(len(cfgs)))
        ax.set_yticklabels(cfgs, fontsize=9)
        ax.set_ylim(-0.7, len(cfgs) - 0.3)
        ax.set_title(f"weights vs {reference} (same seed): bitwise equal?", fontsize=10, loc="left")
        _style(ax)
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_xlabel("training step", fontsize=9)
        _weight_margins(fig, cfgs, legend_chars=48)
        return _png(fig)
    floor = 10 ** math.floor(math.log10(known.min())) / 10 if len(known) else 1e-16
    ax.set_yscale("log")
    ax.axhline(floor, color="#2e7d32", linewidth=0.8, linestyle=":")
    ax.annotate("bitwise equal", (0.0, floor), xycoords=("axes fraction", "data"), xytext=(4, 3),
                textcoords="offset points", fontsize=8, color="#2e7d32")
    for cfg in cfgs:
        g = wd[wd["config"] == cfg]
        c = colors.get(cfg, "#555555")
        for (_, _), s in g.groupby(["seed", "repeat"]):
            y = s["rel"].astype(float).where(s["rel"] > 0, floor)
            ax.plot(s["step"], y, color=c, linewidth=0.8, alpha=0.45)
        med = g.groupby("step")["rel"].median().astype(float)
        ax.plot(med.index, med.where(med > 0, floor), color=c, linewidth=2.2, marker="o", markersize=4,
                label=f"{cfg} (repeat of the reference)" if cfg == reference else cfg)
    top = float(np.nanmax(np.where(np.isfinite(rel), rel, np.nan))) if np.isfinite(rel).any() else floor
    ax.set_ylim(floor / 3, max(top, floor) * 3)
    ax.set_title(f"weights vs {reference}, same seed: ‖w − w_ref‖ / ‖w_ref‖ (thick: median, thin: each seed)",
                 fontsize=10, loc="left")
    ax.set_xlabel("training step", fontsize=9)
    ax.set_ylabel("relative L2 distance", fontsize=9)
    _style(ax)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _weight_margins(fig, [], legend_chars=max(len(str(c)) + (28 if c == reference else 0) for c in cfgs))
    return _png(fig)


def _weight_margins(fig: Figure, ylabels: list[str], legend_chars: int) -> None:
    w, h = fig.get_figwidth(), fig.get_figheight()
    left = 0.85 if not ylabels else 0.3 + 0.075 * max(len(str(c)) for c in ylabels)
    right = min(0.45 * w, 0.45 + 0.068 * legend_chars)  # the legend sits right of the axes
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - 0.35 / h, bottom=0.55 / h)
