"""``devicediff diverge``: where do two configs part ways, and is it rounding or a bug?

Two execution configs of a study are stepped in lockstep, each in its own
worker process, from the same initial weights and the same batches. Every
step, per module, forward outputs, parameter gradients, the loss and the
updated weights are compared, and each difference is set against the
configs' own rounding errors, measured against a float64 reference of the
same step. See ``docs/diverge.md`` for the rule and its measurements.

Library::

    from devicediff.diverge import diverge, plot_divergence
    payload = diverge(load_study("quick"), "cpu-1t", "cpu-2t", steps=5)
    payload["summary"]["verdict"]            # "identical" | "rounding" | "beyond rounding"
    plot_divergence(payload, "diverge.png")

Submodules: ``format`` (the step files, numpy only; what another framework's
worker writes), ``probe`` (the PyTorch worker side), ``compare`` (the rule),
``lockstep`` (running both sides), ``report`` (tables and the plot).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from devicediff.diverge.lockstep import DivergeError  # noqa: F401

__all__ = ["diverge", "diverge_cli", "plot_divergence", "print_divergence", "DivergeError"]

# Exit codes of ``devicediff diverge`` (as ``diff``): 0 identical or rounding,
# 1 beyond rounding, 2 usage error or a side that could not run.
EXIT_SAME, EXIT_BEYOND, EXIT_ERROR = 0, 1, 2


def diverge(*args, **kwargs) -> dict:
    from devicediff.diverge.lockstep import diverge as _diverge

    return _diverge(*args, **kwargs)


def plot_divergence(payload: dict, path):
    from devicediff.diverge.report import plot_divergence as _plot

    return _plot(payload, path)


def print_divergence(console, payload: dict) -> None:
    from devicediff.diverge.report import print_divergence as _print

    _print(console, payload)


def __getattr__(name: str):
    if name == "DivergeError":
        from devicediff.diverge.lockstep import DivergeError

        return DivergeError
    raise AttributeError(name)


def diverge_cli(args) -> int:
    """``devicediff diverge STUDY --a CONFIG --b CONFIG [--steps N] [--seed S] [--threshold T]
    [--set K=V] [--store DB]``: print the tables and the summary line, store the
    payload, return 0 (identical or rounding), 1 (beyond rounding) or 2 (a side
    could not run)."""
    import sys

    from rich.console import Console

    from devicediff.console import wide_console
    from devicediff.diverge.compare import BEYOND
    from devicediff.diverge.lockstep import DivergeError
    from devicediff.diverge.lockstep import diverge as _diverge
    from devicediff.diverge.report import print_divergence as _print
    from devicediff.store import open_store
    from devicediff.study import load_study, parse_overrides

    study = load_study(args.study, overrides=parse_overrides(getattr(args, "set", None)) or None)
    study.config(args.a)  # unknown names fail here, before anything runs
    study.config(args.b)
    console = wide_console()
    err = Console(stderr=True)
    store = open_store(args.store)
    try:
        with err.status(f"diverge: stepping {args.a} and {args.b} in lockstep ({args.steps} steps)") as status:
            seen: dict[str, int] = {}

            def on_step(side: str, step: int, total: int) -> None:
                seen[side] = step
                status.update(f"diverge: {args.a} step {seen.get('A', 0)}/{total}, "
                              f"{args.b} step {seen.get('B', 0)}/{total}")

            try:
                payload = _diverge(study, args.a, args.b, steps=args.steps, seed=args.seed,
                                   threshold=args.threshold, store=store, store_path=args.store, on_step=on_step)
            except DivergeError as e:
                print(f"devicediff: error: {e}", file=sys.stderr)
                return EXIT_ERROR
    finally:
        store.close()
    _print(console, payload)
    return EXIT_BEYOND if payload["summary"]["verdict"] == BEYOND else EXIT_SAME
