"""``devicediff report``: one self-contained, escaped HTML page plus PNG files, from a store.

The stores here are synthetic (``report_synth``: written through the Store API, no training), so
the whole file runs in seconds; ``test_report_real_study`` (slow) trains a tiny real study.
"""

from __future__ import annotations

import base64
import html as htmllib
import re
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from report_synth import DIVERGE_XSS, ERR, XSS, make_store

from devicediff.cli import UsageError, main
from devicediff.report import REPORT_NAME, write_report
from devicediff.analysis.frames import config_identity
from devicediff.store import SQLiteStore

PNG = b"\x89PNG\r\n\x1a\n"
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
PLOTS = ("verdict_plot", "curve_plot", "weight_plot", "churn_plot", "class_heatmap", "disagreement_grid")


@pytest.fixture
def stub_plots(monkeypatch):
    """For tests about files, errors and layout, not figures: drawing is most of a report's time."""
    from devicediff import report
    from devicediff.report import plots

    for name in PLOTS:
        monkeypatch.setattr(plots, name, lambda *a, **k: TINY_PNG)
    monkeypatch.setattr(report, "_diverge_png", lambda payload, out: (None, None))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    store = make_store(d / "s.db", d / "files")
    out = d / "out"
    path = write_report(store, out)
    store.close()
    return d, out, path, path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    d = tmp_path_factory.mktemp("merged")
    store = make_store(d / "m.db", d / "files", machines=("aaaaaa1111", "bbbbbb2222"), seeds=4)
    path = write_report(store, d / "out")
    store.close()
    return path.read_text(encoding="utf-8")


def test_writes_one_html_and_the_plots_as_png(synth):
    _, out, path, _ = synth
    assert path == out / REPORT_NAME and path.is_file()
    pngs = sorted(p.name for p in out.glob("*.png"))
    kinds = {"verdicts", "curve-eval_loss", "curve-train_loss", "weight-distance"}
    for k in kinds:
        assert any(n.endswith(f"-{k}.png") for n in pngs), (k, pngs)
    assert sum("prediction-grid" in n for n in pngs) == 4  # the four configs that finished
    for p in out.glob("*.png"):
        assert p.read_bytes().startswith(PNG)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_self_contained_every_image_embedded(synth):
    _, out, _, page = synth
    uris = DATA_URI.findall(page)
    files = {p.read_bytes() for p in out.glob("*.png")}
    decoded = [base64.b64decode(u) for u in uris]
    assert decoded and all(b.startswith(PNG) for b in decoded)
    assert set(decoded) == files  # every file is in the page, and nothing else
    # no external resource of any kind
    for attr in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert attr.startswith(("data:", "#")), attr
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_hostile_text_is_escaped(synth):
    _, _, _, page = synth
    assert XSS not in page and DIVERGE_XSS not in page
    assert htmllib.escape(XSS, quote=False) in page
    assert "<script" not in page.lower()  # no script element at all
    assert "<em>not</em>" not in page and "&lt;em&gt;not&lt;/em&gt;" in page  # the description
    assert htmllib.escape(ERR, quote=False) in page and "<b>CUDA</b>" not in page


def test_no_host_names_or_local_paths(synth):
    _, _, _, page = synth
    assert "secret-host-name" not in page and "secret-node" not in page
    assert "/home/someone" not in page  # the diverge payload's workdir


def test_contents_summary_verdicts_and_sections(synth):
    _, _, _, page = synth
    text = htmllib.unescape(page)
    # the plain-language summary of the primary metric
    assert re.search(r"On this machine, .* is bitwise identical to cpu-1t on final_eval_loss; "
                     r"cpu-4t is equivalent to cpu-1t within ±[\d.]+% of final_eval_loss", text)
    assert "gpu-tf32 differs: +3%" in text
    # the verdict tables (primary; secondary, exploratory) with the numbers behind them
    for header in ("verdict", "n", "diff", "% of ref", "90% CI", "95% CI", "p (Holm)", "TOST p (Holm)", "margin ±",
                   "seeds needed"):
        assert f">{header}</th>" in text, header
    assert "Verdicts: primary (final_eval_loss)" in text and "Secondary metrics (exploratory)" in text
    # 4 metrics (final_eval_loss primary; three train-loss summaries secondary), one row each per config
    assert text.count(">differs</td>") == 4 and text.count(">equivalent</td>") == 4
    assert text.count(">identical</td>") == 4
    assert "derived from the reference's seed sd (0.5 × sd)" in text and "% of the reference mean" in text
    for section in ("Study", "Environment", "Result", "Verdicts", "Configs", "Curves", "Bits", "Noise floor",
                    "Divergence", "Runs that did not finish"):
        assert f"<h3>{section}" in page or f">{section}<" in page, section
    assert "Predictions (seed 0, same held-out sequence)" in text
    assert "Test CPU 9000" in text and "NVIDIA H100 80GB HBM3" in text and "580.1" in text
    assert "Configs across machines" not in text  # one machine


def test_failed_and_skipped_runs_with_reasons(synth):
    _, _, _, page = synth
    text = htmllib.unescape(page)
    table = text[text.index("Runs that did not finish"):]
    assert table.count("cuda-broken") == 6 and ERR in table and "no GPU here: skipped" in table


def test_divergence_section(synth):
    _, out, _, page = synth
    text = htmllib.unescape(page)
    assert f"cpu-1t vs {DIVERGE_XSS}" in text and "beyond rounding" in text
    try:
        import devicediff.diverge  # noqa: F401
    except ImportError:
        pytest.skip("devicediff.diverge not present")
    if hasattr(devicediff.diverge, "plot_divergence"):
        assert any("-diverge-0-" in p.name for p in out.glob("*.png"))


def test_divergence_without_the_diverge_package(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_diverge(name, *a, **k):
        if name.startswith("devicediff.diverge"):
            raise ImportError("gone")
        return real(name, *a, **k)

    from devicediff.report import plots

    for name in PLOTS:
        monkeypatch.setattr(plots, name, lambda *a, **k: TINY_PNG)
    monkeypatch.setattr(builtins, "__import__", no_diverge)
    store = make_store(tmp_path / "s.db", tmp_path / "f", seeds=2)
    page = write_report(store, tmp_path / "out").read_text()
    assert "Divergence" in page and "full result" in page
    assert not list((tmp_path / "out").glob("*diverge*.png"))


def test_merged_store_treats_config_and_machine_as_identity(merged):
    text = htmllib.unescape(merged)
    assert "reference <b>cpu-1t@aaaaaa</b>" in text
    for label in ("cpu-1t@bbbbbb", "cpu-4t@aaaaaa", "gpu-tf32@bbbbbb"):
        assert label in text
    assert "Across 2 machines" in text
    assert "Configs across machines" in text
    # machine bbbbbb is 1% off: its copy of the reference config is a comparison of its own
    assert re.search(r"cpu-1t@bbbbbb</td><td class=\"verdict (bad|warn)\">", merged)


def test_config_identity_unit():
    runs = pd.DataFrame({
        "run_id": list("abcdef"), "config": ["ref", "ref", "ref", "x", "x", "y"],
        "machine": ["m2222222", "m1111111", "m1111111", "m1111111", "m2222222", "m1111111"],
        "state": ["finished", "finished", "finished", "finished", "finished", "failed"],
    })
    r, ref, ref_machine, by_machine, order = config_identity(runs, "ref", ["ref", "x", "y"])
    assert by_machine and ref_machine == "m1111111"  # most finished reference runs
    assert ref == "ref@m11111"
    assert order == ["ref@m11111", "ref@m22222", "x@m11111", "x@m22222", "y@m11111"]
    assert list(r["base_config"]) == ["ref", "ref", "ref", "x", "x", "y"]
    one = runs[runs["machine"] == "m1111111"]
    r1, ref1, _, by1, order1 = config_identity(one, "ref", ["ref", "x", "y"])
    assert not by1 and ref1 == "ref" and order1 == ["ref", "x", "y"] and list(r1["config"]) == list(one["config"])


def test_hash_only_store_and_missing_files(tmp_path):
    store = make_store(tmp_path / "s.db", tmp_path / "f", seeds=3, with_files=False)
    path = write_report(store, tmp_path / "out")
    page = htmllib.unescape(path.read_text())
    assert "image file missing" in page
    assert "bits differ" in page or "weight-distance" in page
    assert list((tmp_path / "out").glob("*weight-distance.png"))


def test_study_filter_and_duplicate_names(stub_plots, tmp_path):
    db = tmp_path / "s.db"
    store = make_store(db, tmp_path / "f1", seeds=2, study_name="alpha")
    store.close()
    store = make_store(db, tmp_path / "f2", seeds=3, study_name="alpha")  # same name, another id
    store.close()
    store = make_store(db, tmp_path / "f3", seeds=2, study_name="beta")
    page = write_report(store, tmp_path / "o1", study_name="beta").read_text()
    assert ">beta" in page and "alpha" not in page
    page = write_report(store, tmp_path / "o2").read_text()
    ids = [s for s in store.studies()["study_id"]]
    assert all(i in page for i in ids) and 'class="toc"' in page  # duplicate names are told apart by id


def test_empty_store_and_unknown_study_are_one_line_errors(stub_plots, tmp_path):
    store = SQLiteStore(tmp_path / "e.db")
    with pytest.raises(UsageError, match="holds no studies"):
        write_report(store, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    store.close()
    store = make_store(tmp_path / "s.db", tmp_path / "f", seeds=2, study_name="present")
    with pytest.raises(UsageError) as e:
        write_report(store, tmp_path / "out", study_name="absent")
    assert "'absent'" in str(e.value) and "present" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        write_report(store, tmp_path / "afile")


def test_only_failed_runs_and_a_single_config(stub_plots, tmp_path):
    from report_synth import CONFIGS

    broken = [c for c in CONFIGS if c[0] == "cuda-broken"]
    store = make_store(tmp_path / "a.db", tmp_path / "f", seeds=2, configs=[("cpu-1t", *broken[0][1:])])
    page = htmllib.unescape(write_report(store, tmp_path / "o1").read_text())
    assert "No verdict" in page and ERR in page
    store = make_store(tmp_path / "b.db", tmp_path / "g", seeds=2, configs=CONFIGS[:1])
    page = htmllib.unescape(write_report(store, tmp_path / "o2").read_text())
    assert "fewer than two configs" in page and "Curves" in page


def test_study_without_runs(tmp_path):
    store = SQLiteStore(tmp_path / "s.db")
    store.put_study("0123456789abcdef", "pending", {"reference": "a", "configs": [{"name": "a"}], "seeds": [0]})
    page = write_report(store, tmp_path / "out").read_text()
    assert "No runs in the store for this study yet" in page


def test_rewrite_is_atomic(stub_plots, tmp_path, monkeypatch):
    store = make_store(tmp_path / "s.db", tmp_path / "f", seeds=2)
    out = tmp_path / "out"
    first = write_report(store, out).read_bytes()
    from devicediff.report import html

    def boom(*a, **k):
        raise RuntimeError("render failed")

    monkeypatch.setattr(html, "render_page", boom)
    with pytest.raises(RuntimeError):
        write_report(store, out)
    assert (out / REPORT_NAME).read_bytes() == first  # the old report is intact
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_cli_report(stub_plots, tmp_path, capsys):
    store = make_store(tmp_path / "s.db", tmp_path / "f", seeds=2, study_name="clistudy")
    store.close()
    assert main(["report", "--store", str(tmp_path / "s.db"), "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "o" / REPORT_NAME)
    assert main(["report", "--store", str(tmp_path / "s.db"), "--out", str(tmp_path / "o"), "--study", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no study named 'nope'" in err[0] and "clistudy" in err[0]
    assert main(["report", "--store", str(tmp_path / "missing.db"), "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    sqlite3.connect(tmp_path / "e.db").close()  # an empty file: read-only commands do not make it a store
    assert main(["report", "--store", str(tmp_path / "e.db"), "--out", str(tmp_path / "o2")]) == 2
    assert "an empty file, not a devicediff store" in capsys.readouterr().err
    assert sqlite3.connect(tmp_path / "e.db").execute("select count(*) from sqlite_master").fetchone() == (0,)


@pytest.mark.slow
def test_report_real_study(tmp_path, tiny_study):
    from conftest import devicediff

    study = tiny_study(seeds=2)
    r = devicediff("run", str(study), "--store", str(tmp_path / "s.db"), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = devicediff("report", "--store", str(tmp_path / "s.db"), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = htmllib.unescape((tmp_path / "rep" / REPORT_NAME).read_text())
    assert "On this machine, cpu-2t" in page and "cpu-1t" in page
    assert len(DATA_URI.findall(page)) >= 3
    assert Path(r.stdout.strip()).name == REPORT_NAME
