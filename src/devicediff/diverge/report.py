"""Show a diverge payload: rich tables in the terminal, a PNG of divergence over steps."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from devicediff.diverge.compare import BEYOND, IDENTICAL, RANDOM, ROUNDING, SUSPECT

STYLE = {IDENTICAL: "dim", ROUNDING: "green", BEYOND: "bold red", SUSPECT: "bold magenta", RANDOM: "yellow"}


def _g(x, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if x >= 1e300:
        return "inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}e}"


def focus_step(payload: dict) -> int:
    """The step whose tensors are listed in full: where beyond rounding first shows,
    else where the first difference is, else step 1."""
    s = payload["summary"]
    for k in ("first_beyond", "first_suspect", "first_random", "first_difference"):
        if s.get(k):
            return int(s[k]["step"])
    return 1


def tensor_table(payload: dict, step: int, *, max_rows: int = 60) -> Table:
    t = Table(title=f"step {step}: every tensor (teacher-forced: both sides start the step from the same state)",
              title_justify="left")
    for col, just in (("step", "right"), ("module/tensor", "left"), ("kind", "left"), ("max|A−B|", "right"),
                      ("rel L2 A−B", "right"), ("rounding A", "right"), ("rounding B", "right"),
                      ("own A/bound", "right"), ("own B/bound", "right"), ("ratio", "right"),
                      ("sensitivity", "right"), ("class", "left")):
        t.add_column(col, justify=just, no_wrap=col != "module/tensor", min_width=22 if col == "module/tensor" else None)
    rows = [r for r in payload["rows"] if r["step"] == step]
    if len(rows) > max_rows:  # keep the interesting ones: every non-rounding row, then the largest ratios
        keep = {id(r) for r in rows if r["cls"] in (BEYOND, SUSPECT)}
        for r in sorted(rows, key=lambda r: -(r["ratio"] or 0)):
            if len(keep) >= max_rows:
                break
            keep.add(id(r))
        hidden = len(rows) - len(keep)
        rows = [r for r in rows if id(r) in keep]
        t.caption = f"{hidden} more tensors of this step not shown (all in the stored payload)"
    for r in rows:
        name = r["name"] + (f"  [dim]({r['note']})[/dim]" if r.get("note") else "")
        t.add_row(str(r["step"]), name, r["kind"], _g(r["max_abs"]), _g(r["rel_l2"]), _g(r["err_a"]), _g(r["err_b"]),
                  _g(r.get("own_a")), _g(r.get("own_b")), _g(r["ratio"]), _g(r.get("sensitivity"), 1),
                  f"[{STYLE.get(r['cls'], '')}]{r['cls']}[/]")
    return t


def growth_table(payload: dict) -> Table:
    t = Table(title="over steps: per-step arithmetic (teacher-forced) and free-running drift", title_justify="left")
    for col in ("step", "worst tensor", "max ratio", "beyond", "start gap", "weights A−B",
                "free: weights A−B", "free: drift A", "free: drift B", "free: |ΔL|"):
        t.add_column(col, justify="left" if col == "worst tensor" else "right", no_wrap=col != "worst tensor",
                     min_width=24 if col == "worst tensor" else None)
    for st in payload["per_step"]:
        fw = st.get("free_weights") or {}
        w = st.get("weights") or {}
        t.add_row(str(st["step"]), st.get("worst") or "—", _g(st.get("max_ratio")),
                  f"[{STYLE[BEYOND]}]{st['beyond']}[/]" if st["beyond"] else "0", _g(st.get("start_gap")),
                  _g(w.get("rel_l2")), _g(fw.get("rel_l2")), _g(fw.get("err_a")), _g(fw.get("err_b")),
                  _g(st.get("free_loss_diff")))
    t.caption = ("weights A−B: relative L2 over all weights after the step; start gap: the same for the two "
                 "sides' starting states (0 until a beyond-rounding difference or unshared random draws move them "
                 "apart); free: copies trained normally, never re-synchronised; drift X: free-running X vs its float64 "
                 "teacher trajectory; |ΔL|: their loss difference")
    return t


def print_divergence(console: Console, payload: dict) -> None:
    a, b = payload["a"], payload["b"]
    console.print(f"[bold]diverge[/bold] {payload['study']}: A = {a}, B = {b}, seed {payload['seed']}, "
                  f"{payload['steps']} step(s), threshold {payload['threshold']:g}", highlight=False)
    console.print("rounding X = ‖X − its float64 reference‖/‖ref‖; ratio = ‖A−B‖ / (rounding A + rounding B + "
                  "run-to-run variation + floor), in norms; beyond rounding when ratio > threshold; own X/bound = X's "
                  "own error (its operation replayed in float64 on X's inputs) over what its precision explains, "
                  f"suspect above {payload.get('suspect_factor', 1.0):g}; sensitivity = the smallest relative change "
                  "of the tensor the threshold calls beyond rounding", highlight=False)
    console.print(tensor_table(payload, focus_step(payload)))
    console.print(growth_table(payload))
    s = payload["summary"]
    names = {"A": a, "B": b}
    nd = [f"{side} ({names[side]})" for side, v in s.get("nondeterministic", {}).items() if v]
    if nd:
        console.print(f"run-to-run variation measured in: {', '.join(nd)} (counted as rounding)", highlight=False)
    lr = s.get("largest_rounding", {})
    bits = []
    for side, v in lr.items():
        if not v:
            continue
        own = f"{v['own']:.2g}x its rounding bound, " if v.get("own") is not None else ""
        bits.append(f"{side} ({v['config']}) {own}{v['rel']:.2e} relative ({v['kind']} {v['name']}, step {v['step']})")
    if bits:
        console.print("largest own rounding error (tensors not identical): " + "; ".join(bits), highlight=False)
    sens = s.get("sensitivity")
    if sens:
        console.print(f"sensitivity at step {sens['step']}: a relative change above {sens['median']:.1e} (median over "
                      f"{sens['tensors']} tensors; {sens['max']:.1e} for the least sensitive, {sens['max_kind']} "
                      f"{sens['max_name']}) would be called beyond rounding", highlight=False)
    style = STYLE.get(s["verdict"], "")
    console.print(f"[{style}]{s['line']}[/]", highlight=False, soft_wrap=True)  # one line: scripts grep it
    ops = s.get("ops")
    if ops:  # the operation pass at the first step beyond rounding or suspect: one line too
        console.print(f"step {ops['step']}, operation level: {ops['line']}", highlight=False, soft_wrap=True)


def plot_divergence(payload: dict, path: str | Path) -> Path:
    """Divergence over steps per module on a log scale, as a PNG at ``path``.

    Left: teacher-forced per-step difference ‖A−B‖/‖ref‖ per module (largest
    over the module's tensors: outputs, gradients, weights), with the configs'
    own rounding error (grey band: smallest to largest over tensors), beyond-
    rounding points marked x and bitwise-equal ones ▼ at the bottom. Right: the
    free-running copies' weights per module and their loss. One colour per
    module in both panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)

    def per_module(rows):
        mods: dict[str, dict[int, tuple[float, bool]]] = {}
        rnd: dict[int, list[float]] = {}
        for r in rows:
            v = r["rel_l2"]
            if v is None:
                continue
            cur = mods.setdefault(r["module"], {}).get(r["step"], (0.0, False))
            mods[r["module"]][r["step"]] = (max(cur[0], min(v, 1e300)), cur[1] or r["cls"] in (BEYOND, SUSPECT))
            e = (r["err_a"] or 0.0) + (r["err_b"] or 0.0)
            rnd.setdefault(r["step"], []).append(e)
        return mods, rnd

    panels = [(payload["rows"], "per step (teacher-forced: same starting state)"),
              (payload.get("free", []), "free running (never re-synchronised)")]
    data = [per_module(rows) for rows, _ in panels]
    order = list(dict.fromkeys(m for mods, _ in data for m in mods))
    cmap = plt.get_cmap("tab20" if len(order) > 10 else "tab10")
    color = {m: cmap(i % cmap.N) for i, m in enumerate(order)}
    positive = [v for mods, rnd in data for ser in mods.values() for v, _ in ser.values() if v > 0]
    positive += [e for _, rnd in data for es in rnd.values() for e in es if e > 0]
    bottom = min(positive) / 30 if positive else 1e-12  # where bitwise-equal (0) points are drawn

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (mods, rnd), (_, title) in zip(axes, data, panels):
        if rnd:
            steps = sorted(rnd)
            ax.fill_between(steps, [max(min(rnd[s]), bottom) for s in steps], [max(max(rnd[s]), bottom) for s in steps],
                            color="0.85", label="rounding A + B (min–max over tensors)")
        for mod, series in mods.items():
            steps = sorted(series)
            ys = [max(series[s][0], bottom) for s in steps]
            ax.plot(steps, ys, marker="o", ms=3, lw=1.2, color=color[mod], label=mod)
            zero = [(s, bottom) for s in steps if series[s][0] == 0]
            if zero:
                ax.scatter(*zip(*zero), marker="v", s=30, color=color[mod], zorder=4)
            bad = [(s, max(series[s][0], bottom)) for s in steps if series[s][1]]
            if bad:
                ax.scatter(*zip(*bad), marker="x", s=60, color=color[mod], zorder=5)
        ax.set_yscale("log")
        ax.set_ylim(bottom=bottom / 2)
        ax.set_xlabel("step")
        ax.set_ylabel("‖A − B‖ / ‖ref‖ (largest tensor of the module)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(labels) <= 24:
        axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{payload['study']}: {payload['a']} vs {payload['b']}: {payload['summary']['verdict']}  "
                 f"(x beyond rounding, ▼ bitwise equal)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
