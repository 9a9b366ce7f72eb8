"""Predictions for the report (issue #16): does a config change what the network predicts?

From the runs' ``predictions`` artifacts (held-out predicted classes, ``.npy``; the classifier
workload writes them with ``labels.npy``): churn against the reference at the same seed set
against the seed-churn floor (:mod:`devicediff.analysis.churn`), per-class accuracy differences
with their own Holm family, and the held-out inputs on which the configs disagree most, with the
inputs themselves when they can be loaded (MNIST, or the user's labelled images). A study whose
runs saved no predictions (autoencoder, PredNet) gets ``None``: the section is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from devicediff.analysis.load import run_arrays

PRED_ARTIFACT = "predictions"
LABELS_ARTIFACT = "labels"
N_DISAGREE = 16
_CLASS_PATTERN = r"^final_eval_acc_class_(\d+)$"


@dataclass
class Predictions:
    pairs: pd.DataFrame | None = None  # churn_pairs: kind, config, reference, seed, seed_b, value
    churn: pd.DataFrame | None = None  # churn_table
    per_class: pd.DataFrame | None = None  # per_class_table (long form)
    disagree: pd.DataFrame | None = None  # index, label, share, n_pairs, pred_<config> (modal)
    images: np.ndarray | None = None  # held-out inputs of ``disagree`` (K, C, H, W), or None
    image_note: str = ""  # why there are no images, or where they came from
    n_inputs: int = 0
    problems: list[str] = field(default_factory=list)


def _labels_of(arr: np.ndarray) -> np.ndarray:
    return arr.argmax(axis=1) if arr.ndim == 2 else arr.ravel()


def disagreement(preds: dict, reference: str, labels: np.ndarray | None, k: int = N_DISAGREE) -> pd.DataFrame:
    """The ``k`` held-out inputs on which configs most often predict another class than the
    reference at the same seed: ``share`` = such (config, seed) pairs / all pairs. Inputs where
    every config agrees with the reference are left out. Per config, its most frequent prediction
    over seeds (``pred_<config>``, the reference's first)."""
    ref = {s: _labels_of(a) for (c, s), a in preds.items() if c == reference}
    configs = sorted({c for c, _ in preds if c != reference})
    n = len(next(iter(ref.values()))) if ref else 0
    if not ref or not configs or n == 0:
        return pd.DataFrame()
    flips, pairs = np.zeros(n), 0
    for (c, s), a in preds.items():
        if c != reference and s in ref and len(_labels_of(a)) == n:
            flips += _labels_of(a) != ref[s]
            pairs += 1
    if pairs == 0:
        return pd.DataFrame()
    order = np.lexsort((np.arange(n), -flips))
    top = [i for i in order[:k] if flips[i] > 0]
    rows = []
    for i in top:
        row = {"index": int(i), "label": int(labels[i]) if labels is not None and i < len(labels) else None,
               "share": float(flips[i] / pairs), "n_pairs": pairs}
        for c in [reference, *configs]:
            votes = [int(_labels_of(a)[i]) for (cc, _), a in preds.items() if cc == c and len(_labels_of(a)) == n]
            row[f"pred_{c}"] = int(np.bincount(votes).argmax()) if votes else None
        rows.append(row)
    return pd.DataFrame(rows)


def _subset(idx: np.ndarray, n, seed: int) -> np.ndarray:
    """The classifier's held-out subset of user images (``workloads.classifier._subset``)."""
    from devicediff.workloads.classifier import _subset as sub  # imports torch: guarded by the caller

    return sub(idx, n, seed)


def held_out_inputs(params: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """The classifier's held-out inputs ``(x (N, C, H, W) or (N, H, W), y, source)`` from its
    workload parameters, as the workload selects them. Raises on any failure."""
    data = str(params.get("data", "mnist"))
    eval_size = params.get("eval_size", 10000)
    if data == "mnist":
        from devicediff.data.mnist import load_mnist

        split = params.get("eval_split", "valid")
        x, y = load_mnist(split, params.get("mnist_root"))
        return x[:eval_size], y[:eval_size], f"MNIST {split}"
    from devicediff.data.images import load_labelled_images, split

    imgs = load_labelled_images(data, params.get("image_size"))
    seed = int(params.get("split_seed", 0))
    _, te = split(imgs.y, float(params.get("eval_fraction", 0.2)), seed)
    te = _subset(te, eval_size, seed + 1)
    return imgs.x[te], imgs.y[te], "the study's labelled images"


def _images_for(d: pd.DataFrame, params: dict, labels: np.ndarray | None, n: int) -> tuple[np.ndarray | None, str]:
    try:
        x, y, source = held_out_inputs(params)
    except Exception as e:  # noqa: BLE001 - indices only
        return None, f"held-out inputs not available here ({type(e).__name__}: {e}); indices only"
    if len(x) != n:
        return None, f"{source} gives {len(x)} held-out inputs, the predictions {n}; indices only"
    if labels is not None and (len(labels) != len(y) or not np.array_equal(np.asarray(labels), y)):
        return None, f"{source}: labels differ from the runs' labels.npy; indices only"
    return x[d["index"].to_numpy()], f"inputs: {source}"


def analyse_predictions(data, reference: str) -> Predictions | None:
    """Everything the predictions section shows, or None when no run saved predictions."""
    preds = run_arrays(data.runs, data.artifacts, PRED_ARTIFACT)
    if not preds:
        return None
    from devicediff.analysis import churn as ch

    out = Predictions()
    labels_all = run_arrays(data.runs, data.artifacts, LABELS_ARTIFACT)
    labels = next((np.asarray(v).ravel() for (c, _), v in labels_all.items() if c == reference), None)
    out.n_inputs = len(_labels_of(next(iter(preds.values()))))
    try:
        out.pairs = ch.churn_pairs(preds, reference)
        out.churn = ch.churn_table(preds, reference)
    except Exception as e:  # noqa: BLE001 - each part is reported apart
        out.problems.append(f"churn: {type(e).__name__}: {e}")
    fin = data.finished
    out.per_class = getattr(data, "per_class", None)  # the loader's, when it computes it
    if out.per_class is None and fin is not None and len(fin) and any(
            str(c).startswith("final_eval_acc_class_") for c in fin.columns):
        try:
            out.per_class = ch.per_class_table(fin, reference, pattern=_CLASS_PATTERN)
        except Exception as e:  # noqa: BLE001
            out.problems.append(f"per-class accuracy: {type(e).__name__}: {e}")
    try:
        out.disagree = disagreement(preds, reference, labels)
    except Exception as e:  # noqa: BLE001
        out.problems.append(f"disagreements: {type(e).__name__}: {e}")
    if out.disagree is not None and len(out.disagree):
        workload = str(data.definition.get("workload", ""))
        if workload == "classifier":
            params = data.definition.get("workload_params") or {}
            out.images, out.image_note = _images_for(out.disagree, params, labels, out.n_inputs)
        else:  # a user's own workload: its inputs are its own business
            out.image_note = f"the inputs of workload {workload!r} are not loaded here; indices only"
    return out
