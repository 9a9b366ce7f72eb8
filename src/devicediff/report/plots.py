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


VERDICT_STYLE = {  # marker, colour, label
    "differs": ("D", "#c62828", "differs"),
    "equivalent": ("o", "#2e7d32", "equivalent"),
    "inconclusive": ("s", "#ef8f00", "inconclusive"),
    "identical": ("*", "#1565c0", "identical (bitwise)"),
}
MARGIN_COLOR = "#dcdcdc"


def _clip(v: float, lim: float) -> tuple[float, bool]:
    """``v`` clipped to [-lim, lim]; True when it was beyond (an infinite or off-scale CI end)."""
    if not np.isfinite(v) and not np.isinf(v):
        return math.nan, False
    return (float(np.clip(v, -lim, lim)), bool(abs(v) > lim))


def _panel_limit(g: pd.DataFrame) -> float:
    vals = np.concatenate([g[c].to_numpy(dtype=float) for c in ("lo95", "hi95", "lo90", "hi90", "m", "x")])
    vals = np.abs(vals[np.isfinite(vals)])
    lim = float(vals.max()) if vals.size else 0.0
    return 1.0 if lim == 0 else lim * 1.15


def _verdict_row(ax, r, y: float, lim: float) -> None:
    marker, col, _ = VERDICT_STYLE.get(r["verdict"], ("o", "#555555", ""))
    if np.isfinite(r["m"]):
        ax.fill_betweenx([y - 0.36, y + 0.36], -r["m"], r["m"], color=MARGIN_COLOR, linewidth=0, zorder=1)
    for lo_k, hi_k, lw in (("lo95", "hi95", 1.0), ("lo90", "hi90", 3.2)):
        (lo, lo_cut), (hi, hi_cut) = _clip(r[lo_k], lim), _clip(r[hi_k], lim)
        if np.isnan(lo) or np.isnan(hi):
            continue
        ax.plot([lo, hi], [y, y], color=col, linewidth=lw, solid_capstyle="butt", zorder=3)
        for end, cut, m in ((lo, lo_cut, "<"), (hi, hi_cut, ">")):
            if cut and lw < 2:  # the interval runs off the panel (±inf at tiny n): an arrow says so
                ax.plot([end], [y], m, color=col, markersize=6, zorder=4)
    x, _ = _clip(r["x"], lim)
    if np.isfinite(x):
        ax.plot([x], [y], marker, color=col, markersize=9 if marker == "*" else 7, zorder=5,
                markeredgecolor="white", markeredgewidth=0.6)


def verdict_plot(frame: pd.DataFrame, metrics: list[str], order: list[str], *, title: str,
                 flagged: set[str] | None = None, max_metrics: int = 4) -> bytes | None:
    """The verdict, drawn: per config (rows) and metric (panels), the mean paired difference to
    the reference in % of the reference mean, its 90% CI (thick: the interval TOST uses) and 95%
    CI (thin), over the grey ±margin band; marker by verdict. A thick bar inside the band is
    ``equivalent``; a thin bar clear of 0 is ``differs`` (before multiplicity adjustment). CI
    ends beyond the panel (±inf at tiny n) are clipped and marked with an arrow. ``frame``:
    :func:`devicediff.report.verdicts.plot_frame`. ``flagged`` configs (run warnings) get "(!)"."""
    if frame is None or frame.empty:
        return None
    mets = [m for m in metrics if m in set(frame["metric"])][:max_metrics]
    if not mets:
        return None
    v = frame[frame["metric"].isin(mets)]
    cfgs = [c for c in order if c in set(v["config"])] + sorted(set(v["config"]) - set(order))
    flagged = flagged or set()
    labels = [f"{c} (!)" if c in flagged else str(c) for c in cfgs]
    n = len(cfgs)
    label_w = min(3.4, 0.35 + 0.075 * max(len(s) for s in labels))
    width = max(label_w + 2.7 * len(mets), 6.4)
    ncol = 7 if width >= 9.5 else 4  # the legend: one row when there is room, else two
    top_in, rows_in, bottom_in = (0.8 if ncol == 7 else 1.05), max(0.8, 0.36 * n), 0.9
    height = top_in + rows_in + bottom_in
    fig = Figure(figsize=(width, height))
    width = fig.get_figwidth()
    axes = fig.subplots(1, len(mets), sharey=True, squeeze=False)[0]
    ys = {c: float(n - 1 - i) for i, c in enumerate(cfgs)}
    for ax, met in zip(axes, mets):
        g = v[v["metric"] == met]
        lim = _panel_limit(g)
        for _, r in g.iterrows():
            _verdict_row(ax, r, ys[r["config"]], lim)
        ax.axvline(0, color=REF_COLOR, linewidth=1, zorder=2)
        ax.set_xlim(-lim * 1.04, lim * 1.04)
        ax.set_title(met, fontsize=9.5)
        _style(ax)
        ax.grid(False, axis="y")
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("% of the reference mean", fontsize=8.5)
    axes[0].set_yticks([ys[c] for c in cfgs])
    axes[0].set_yticklabels(labels, fontsize=9)
    for lab, c in zip(axes[0].get_yticklabels(), cfgs):
        if c in flagged:
            lab.set_color("#b26a00")
    axes[0].set_ylim(-0.7, n - 0.3)
    handles = [Patch(color=MARGIN_COLOR, label="±margin"),
               Line2D([], [], color="#555555", linewidth=3.2, label="90% CI (TOST)"),
               Line2D([], [], color="#555555", linewidth=1.0, label="95% CI")] + [
        Line2D([], [], color=c, marker=m, linestyle="none", label=lab) for m, c, lab in VERDICT_STYLE.values()]
    fig.legend(handles=handles, fontsize=8, loc="upper center", ncol=ncol, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.04 / height), columnspacing=1.0, handlelength=1.6)
    fig.suptitle(title, fontsize=9.5, y=0.06 / height, va="bottom")
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


CHURN_COLORS = {"more": "#c62828", "less": "#2e7d32", "inconclusive": "#ef8f00"}
FLOOR_COLOR = "#8a8a8a"


def churn_plot(pairs: pd.DataFrame, table: pd.DataFrame | None, order: list[str], reference: str) -> bytes | None:
    """Churn (% of held-out inputs whose predicted class differs) of each config against the
    reference at the same seed (one dot per seed, bar: mean), under the seed-churn floor (the
    reference against itself at another seed: grey, top row, and a dashed line at its mean).
    Colour by the churn verdict: more than a seed change (red), less (green), inconclusive."""
    if pairs is None or pairs.empty:
        return None
    floor = pairs[pairs["kind"] == "seed"]["value"].astype(float) * 100
    cfgs = [c for c in order if c in set(pairs.loc[pairs["kind"] == "config", "config"])]
    cfgs += sorted(set(pairs.loc[pairs["kind"] == "config", "config"]) - set(cfgs))
    verdict = dict(zip(table["config"], table["verdict"])) if table is not None and len(table) else {}
    rows = [f"seed floor: {reference} vs other seed"] + cfgs
    label_w = min(3.6, 0.35 + 0.072 * max(len(r) for r in rows))
    height = 0.9 + 0.42 * len(rows) + 0.6
    fig = Figure(figsize=(9.0, height))
    ax = fig.add_subplot(111)
    n = len(rows)
    jitter = np.linspace(-0.12, 0.12, 7)
    if len(floor):
        y = n - 1
        ax.plot(floor, y + jitter[np.arange(len(floor)) % 7], "o", color=FLOOR_COLOR, markersize=4, alpha=0.8)
        ax.plot([floor.mean()] * 2, [y - 0.3, y + 0.3], color=FLOOR_COLOR, linewidth=2.5)
        ax.axvline(floor.mean(), color=FLOOR_COLOR, linewidth=1, linestyle="--", zorder=1)
    for i, c in enumerate(cfgs):
        y = n - 2 - i
        vals = pairs[(pairs["kind"] == "config") & (pairs["config"] == c)]["value"].astype(float) * 100
        col = CHURN_COLORS.get(verdict.get(c, ""), "#555555")
        ax.plot(vals, y + jitter[np.arange(len(vals)) % 7], "o", color=col, markersize=5)
        if len(vals):
            ax.plot([vals.mean()] * 2, [y - 0.3, y + 0.3], color=col, linewidth=2.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(reversed(rows)), fontsize=9)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(left=0)
    ax.set_xlabel("churn: % of held-out inputs predicted as another class", fontsize=9)
    ax.set_title(f"prediction churn vs {reference} at the same seed (dots: seeds, bar: mean)", fontsize=10, loc="left")
    _style(ax)
    ax.grid(False, axis="y")
    handles = [Line2D([], [], color=FLOOR_COLOR, marker="o", label="seed floor")] + [
        Line2D([], [], color=c, marker="o", label=f"{k} than a seed change" if k != "inconclusive" else k)
        for k, c in CHURN_COLORS.items()]
    ax.legend(handles=handles, fontsize=8, frameon=False, loc="lower right", ncol=4,
              bbox_to_anchor=(1.0, 1.0 + 0.3 / (height - 1.5)))
    fig.subplots_adjust(left=label_w / 9.0, right=1 - 0.25 / 9.0, top=1 - 0.7 / height, bottom=0.6 / height)
    return _png(fig)


def class_heatmap(per_class: pd.DataFrame, order: list[str], class_names: list[str] | None = None) -> bytes | None:
    """Per-class held-out accuracy difference (config − reference, percentage points, mean over
    seeds), config × class, diverging colours centred on 0; cells whose per-class verdict is
    ``differs`` (their own Holm family) are boxed and starred."""
    if per_class is None or per_class.empty:
        return None
    classes = sorted(pd.unique(per_class["class"]))
    cfgs = [c for c in order if c in set(per_class["config"])] + sorted(set(per_class["config"]) - set(order))
    d = per_class.pivot_table(index="config", columns="class", values="diff", aggfunc="first").reindex(
        index=cfgs, columns=classes) * 100
    verdict = per_class.pivot_table(index="config", columns="class", values="verdict", aggfunc="first").reindex(
        index=cfgs, columns=classes)
    vals = d.to_numpy(dtype=float)
    lim = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 0.0
    lim = lim if lim > 0 else 1.0
    label_w = min(3.2, 0.35 + 0.075 * max(len(str(c)) for c in cfgs))
    width = max(6.0, label_w + 0.62 * len(classes) + 1.4)
    height = 1.3 + 0.42 * len(cfgs)
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot(111)
    im = ax.imshow(np.ma.masked_invalid(vals), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(cfgs)):
        for j in range(len(classes)):
            v = vals[i, j]
            if not np.isfinite(v):
                continue
            star = verdict.iat[i, j] == "differs"
            ax.text(j, i, f"{v:+.1f}{'*' if star else ''}", ha="center", va="center", fontsize=7.5,
                    color="white" if abs(v) > 0.6 * lim else "#1d1d1f", fontweight="bold" if star else "normal")
            if star:
                ax.add_patch(_box(j, i))
    names = [class_names[k] if class_names and k < len(class_names) else str(k) for k in classes]
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(names, fontsize=8.5)
    ax.set_yticks(range(len(cfgs)))
    ax.set_yticklabels(cfgs, fontsize=9)
    ax.set_xlabel("class", fontsize=9)
    ax.set_title("per-class accuracy, config − reference (percentage points; * differs, Holm over this table)",
                 fontsize=9.5, loc="left")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.ax.tick_params(labelsize=8)
    fig.subplots_adjust(left=label_w / width, right=1 - 0.3 / width, top=1 - 0.45 / height, bottom=0.6 / height)
    return _png(fig)


def _box(j: int, i: int):
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#1d1d1f", linewidth=1.6)


def disagreement_grid(disagree: pd.DataFrame, images: np.ndarray, reference: str,
                      configs: list[str], class_names: list[str] | None = None, ncols: int = 8) -> bytes | None:
    """The held-out inputs on which configs most often predict another class than the reference
    (same seed): each image with its index, true class, the reference's prediction and each
    config's (most frequent over seeds), and the share of (config, seed) pairs that flipped."""
    if disagree is None or disagree.empty or images is None or len(images) != len(disagree):
        return None
    name = (lambda k: "?" if k is None or pd.isna(k) else (class_names[int(k)] if class_names and int(k) < len(class_names)
                                                          else str(int(k))))
    k = len(disagree)
    ncols = min(ncols, k)
    nrows = math.ceil(k / ncols)
    others = [c for c in configs if c != reference and f"pred_{c}" in disagree.columns][:3]
    cap_lines = 2 + len(others)
    cell_w, cell_h = 1.25, 1.25 + 0.15 * cap_lines
    fig = Figure(figsize=(ncols * cell_w, nrows * cell_h + 0.3))
    for i, (_, r) in enumerate(disagree.iterrows()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        img = np.asarray(images[i], dtype=float)
        if img.ndim == 3 and img.shape[0] in (1, 3, 4):
            img = img[0] if img.shape[0] == 1 else np.transpose(img[:3], (1, 2, 0))
        ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        lines = [f"#{int(r['index'])} true {name(r.get('label'))}", f"ref {name(r.get(f'pred_{reference}'))}"
                 f" · {100 * r['share']:.0f}% flip"]
        lines += [f"{c if len(c) <= 14 else c[:13] + '…'} {name(r.get(f'pred_{c}'))}" for c in others]
        ax.set_title("\n".join(lines), fontsize=6.5, loc="left", pad=2)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - (0.15 * cap_lines + 0.1) / (nrows * cell_h + 0.3),
                        bottom=0.02, hspace=0.15 * cap_lines + 0.35, wspace=0.1)
    return _png(fig)
