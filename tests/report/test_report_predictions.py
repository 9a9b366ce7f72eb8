"""The report's predictions, warnings, verdict-plot and efficiency sections (issues #13, #16,
#17, #18), on synthetic classifier stores (``predictions_synth``: no training, seconds)."""

from __future__ import annotations

import html as htmllib
import math
import sys
import types

import numpy as np
import pandas as pd
import pytest
from predictions_synth import WARNING, make_store

from devicediff.report import plots, write_report
from devicediff.report.verdicts import looks_summary, plot_frame

PNG = b"\x89PNG\r\n\x1a\n"


def _mnist() -> bool:
    try:
        from devicediff.data.mnist import load_mnist

        load_mnist("valid")
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    store = make_store(d / "c.db", d / "files")
    out = d / "out"
    page = write_report(store, out).read_text(encoding="utf-8")
    store.close()
    return out, page, htmllib.unescape(page)


def test_churn_heatmap_and_disagreement_grid(classifier):
    out, _, text = classifier
    names = {p.name.split("-", 2)[-1] for p in out.glob("*.png")}
    assert {"churn.png", "per-class-accuracy.png", "verdicts.png"} <= names, names
    for p in out.glob("*.png"):
        assert p.read_bytes().startswith(PNG)
    assert "Predictions: does a config change what the network predicts?" in text
    assert "On the same 200 held-out inputs" in text
    # churn verdicts: cpu-2t flips 3 inputs (below the seed floor), gpu-dropout 15% (above it)
    churn = text[text.index("seed churn</th>"):]
    assert ">cpu-2t</td><td class=\"verdict ok\">less" in churn
    assert ">gpu-dropout</td><td class=\"verdict bad\">more" in churn
    # per-class: its own family; classes 3 and 4 of gpu-dropout differ
    assert "2 of 20 config × class cells differ (Holm over the 20)" in text
    # the inputs the configs disagree on: images when MNIST is here, a table always
    assert "The held-out inputs the configs disagree on most" in text and "input #" in text
    if _mnist():
        assert "disagreements.png" in names and "inputs: MNIST valid" in text
    else:
        assert "indices only" in text


def test_warnings_banner_and_flagged_rows(classifier):
    _, page, text = classifier
    assert 'class="banner"' in page and WARNING in text and "(6 of 6 runs)" in text
    primary = text[text.index("Verdicts: primary"):text.index("Secondary metrics")]
    assert "⚠ gpu-dropout" in primary and "pairing by seed may not hold (run warnings)" in primary
    assert "⚠ cpu-2t" not in primary


def test_library_versions_and_primary_in_header(classifier):
    _, _, text = classifier
    configs = text[text.index("<h3>Configs"):]
    assert "numpy 2.0.1, torch 2.11.0+cu130" in configs and "numpy 2.0.1, torch 2.13.0" in configs
    assert "final_eval_accuracy (declared by the workload)" in text
    assert "Verdicts: primary (final_eval_accuracy)" in text


def test_store_without_predictions_has_no_prediction_section(tmp_path):
    store = make_store(tmp_path / "n.db", tmp_path / "f", seeds=3, with_predictions=False)
    out = tmp_path / "out"
    text = htmllib.unescape(write_report(store, out).read_text())
    assert "Predictions: does a config" not in text and "Not shown" not in text
    assert not [p for p in out.glob("*.png") if p.name.endswith(("churn.png", "disagreements.png"))]
    assert list(out.glob("*-verdicts.png"))


def test_unloadable_inputs_show_indices_only(tmp_path):
    store = make_store(tmp_path / "u.db", tmp_path / "f", params={"data": str(tmp_path / "gone.npz")})
    out = tmp_path / "out"
    text = htmllib.unescape(write_report(store, out).read_text())
    assert "indices only" in text and "input #" in text
    assert not list(out.glob("*disagreements.png")) and list(out.glob("*churn.png"))


def test_a_users_own_classifier_is_not_shown_mnist(tmp_path):
    """Predictions of a user's workload: churn as for the built-in classifier, but its inputs are not
    looked for in MNIST (whose validation digits would be the wrong images, or the wrong count)."""
    store = make_store(tmp_path / "w.db", tmp_path / "f", workload="blobs.py:make", params={"n": 3000})
    out = tmp_path / "out"
    text = htmllib.unescape(write_report(store, out).read_text())
    assert "the inputs of workload 'blobs.py:make' are not loaded here; indices only" in text
    assert "MNIST" not in text and "input #" in text and list(out.glob("*churn.png"))


def test_infinite_ci_ends_are_clipped(tmp_path):
    # a constant offset in 3 seeds: zero-variance differences, 90%/95% CIs of (-inf, inf)
    store = make_store(tmp_path / "i.db", tmp_path / "f", seeds=3, configs=("cpu-1t", "cpu-4t"),
                       offset={"cpu-4t": 0.01})
    from devicediff.report import analyse
    from devicediff.report.data import load_report_data

    a = analyse(load_report_data(store, store.studies().iloc[0]))
    row = a.verdicts[(a.verdicts["config"] == "cpu-4t") & (a.verdicts["role"] == "primary")].iloc[0]
    assert math.isinf(row["ci90_low"]) and math.isinf(row["ci95_high"])
    out = tmp_path / "out"
    text = htmllib.unescape(write_report(store, out).read_text())
    assert "[−∞, ∞]" in text and "figure verdicts" not in text
    assert (next(out.glob("*-verdicts.png"))).read_bytes().startswith(PNG)


def test_verdict_plot_unit_with_infinities():
    v = pd.DataFrame({
        "config": ["a", "b", "c", "d"], "metric": ["m"] * 4, "mean_ref": [2.0] * 4,
        "diff": [0.01, 0.0, 0.3, -0.02], "margin": [0.05, 0.05, 0.05, np.nan],
        "ci90_low": [-np.inf, 0.0, 0.25, -0.03], "ci90_high": [np.inf, 0.0, 0.35, -0.01],
        "ci95_low": [-np.inf, 0.0, 0.2, np.nan], "ci95_high": [np.inf, 0.0, 0.4, np.nan],
        "verdict": ["inconclusive", "identical", "differs", "equivalent"],
    })
    png = plots.verdict_plot(plot_frame(v, ["m"]), ["m"], ["a", "b", "c", "d"], title="t", flagged={"c"})
    assert png.startswith(PNG)
    assert plots.verdict_plot(plot_frame(v, ["other"]), ["other"], ["a"], title="t") is None


def test_sequential_looks_are_shown(tmp_path):
    store = make_store(tmp_path / "s.db", tmp_path / "f", seeds=3, configs=("cpu-1t", "cpu-2t"), with_predictions=False)
    sid = store.studies()["study_id"].iloc[0]
    for k, n in enumerate((2, 3), start=1):
        store.put_analysis(sid, "sequential", f"look={k}", {"look": k, "n_looks": 5, "n": n, "max_seeds": 10,
                                                            "decisions": {"cpu-2t": "continue" if k == 1 else "differs"}})
    text = htmllib.unescape(write_report(store, tmp_path / "out").read_text())
    assert "Seeds until decided" in text and "2 looks taken of at most 5, at 2, 3 seeds (at most 10 seeds)" in text
    assert looks_summary(None) is None and looks_summary(pd.DataFrame()) is None


def test_efficiency_section_when_the_module_is_present(tmp_path, monkeypatch):
    store = make_store(tmp_path / "e.db", tmp_path / "f", seeds=2, configs=("cpu-1t", "cpu-2t"), with_predictions=False)
    page = htmllib.unescape(write_report(store, tmp_path / "o1").read_text())
    if "<h3>Efficiency" in page:
        pytest.skip("devicediff.analysis.efficiency is present: the fake below would shadow it")
    mod = types.ModuleType("devicediff.analysis.efficiency")
    mod.efficiency = lambda runs, wall, slots: {"efficiency": 0.25, "startup": 3.0, "slots": slots}
    monkeypatch.setitem(sys.modules, "devicediff.analysis.efficiency", mod)
    text = htmllib.unescape(write_report(store, tmp_path / "o2").read_text())
    assert "<h3>Efficiency" in text and "Σ(train + eval) / (wall × slots) = 25%" in text
    assert "estimated from the runs' start and end times" in text and "startup" in text
