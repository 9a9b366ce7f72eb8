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
    payload["summary"]["verdict"]   # "identical" | "rounding" | "random" | "suspect" | "beyond rounding"
    payload["summary"]["ops"]["line"]   # beyond rounding or suspect: the first operation that differs
    plot_divergence(payload, "diverge.png")

Submodules: ``format`` (the step files, numpy only; what every framework's
lockstep side writes: ``frameworks/<name>/lockstep.py``), ``compare`` (the rule),
``lockstep`` (running both sides), ``report`` (tables and the plot).
"""

from __future__ import annotations

from devicediff.diverge.compare import BEYOND, IDENTICAL, RANDOM, ROUNDING, SUSPECT
from devicediff.errors import DivergeError

__all__ = ["diverge", "plot_divergence", "print_divergence", "DivergeError", "BEYOND", "IDENTICAL", "ROUNDING",
           "SUSPECT", "RANDOM", "EXIT_CODES"]

#: the command's exit status per verdict (as ``diff``: 0 the same up to rounding); 2 stays the
#: usage error and 3 failed runs (cli.py)
EXIT_CODES = {IDENTICAL: 0, ROUNDING: 0, BEYOND: 1, SUSPECT: 4, RANDOM: 5}


def diverge(*args, **kwargs) -> dict:
    from devicediff.diverge.lockstep import diverge as _diverge

    return _diverge(*args, **kwargs)


def plot_divergence(payload: dict, path):
    from devicediff.diverge.report import plot_divergence as _plot

    return _plot(payload, path)


def print_divergence(console, payload: dict) -> None:
    from devicediff.diverge.report import print_divergence as _print

    _print(console, payload)
