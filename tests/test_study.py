"""Study files: strict parsing, one clear line per mistake."""

from __future__ import annotations

import pytest

from devicediff.study import StudyError, load_study, parse_study, preset_names

BASE = {
    "name": "s",
    "workload": {"name": "autoencoder"},
    "configs": [{"name": "a", "reference": True}, {"name": "b", "threads": 2}],
    "seeds": 3,
    "budget": {"epochs": 1},
}


def doc(**changes):
    d = {k: (v.copy() if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in BASE.items()}
    d.update(changes)
    return d


def test_valid_study_expands_seed_major_cells():
    s = parse_study(doc())
    assert s.reference == "a" and s.seeds == (0, 1, 2)
    cells = s.cells()
    assert [(c.config.name, c.seed) for c in cells[:2]] == [("a", 0), ("b", 0)]
    assert len(cells) == 6
    assert all(c.init_seed == c.seed and c.data_seed == c.seed for c in cells)


def test_vary_init_only_holds_data_seed():
    s = parse_study(doc(seeds={"count": 2, "vary": ["init"], "base": 7}))
    assert {c.data_seed for c in s.cells()} == {7}
    assert {c.init_seed for c in s.cells()} == {7, 8}


def test_study_id_changes_with_definition_not_notes():
    a = parse_study(doc())
    b = parse_study(doc(configs=[{"name": "a", "reference": True, "note": "hi"}, {"name": "b", "threads": 2}]))
    c = parse_study(doc(budget={"epochs": 2}))
    assert a.study_id == b.study_id != c.study_id


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"bogus": 1}, "study: unknown key 'bogus'"),
        ({"configs": [{"name": "a", "reference": True, "thread": 2}, {"name": "b"}]}, "unknown key 'thread' (did you mean 'threads'?)"),
        ({"configs": [{"name": "a", "reference": True, "threads": "4"}, {"name": "b"}]}, "configs[0].threads: expected int"),
        ({"configs": [{"name": "a", "reference": True}, {"name": "a"}]}, "duplicate config name"),
        ({"configs": [{"name": "a"}, {"name": "b"}]}, "no reference config"),
        ({"reference": "zzz"}, "reference: 'zzz' is not a config name"),
        ({"seeds": 0}, "seeds.count: must be >= 1"),
        ({"seeds": {"list": []}}, "seeds.list: must hold at least one seed"),
        ({"seeds": {"count": 2, "vary": ["weights"]}}, "unknown noise source 'weights'"),
        ({"workload": {"name": "nope"}}, "unknown workload 'nope'"),
        ({"budget": {"epochs": 1, "steps": 3}}, "either epochs or steps"),
        ({"configs": [{"name": "a", "reference": True, "device": "tpu"}, {"name": "b"}]}, "is not a device"),
        ({"configs": [{"name": "a", "reference": True, "tf32": True}, {"name": "b"}]}, "only meaningful on a GPU"),
        ({"configs": [{"name": "a", "reference": True, "framework": "jax"}, {"name": "b"}]}, "unknown framework 'jax'"),
        ({"configs": [{"name": "a", "reference": True, "threads": True}, {"name": "b"}]}, "expected int, got bool"),
    ],
)
def test_bad_studies_fail_with_one_line(changes, needle):
    with pytest.raises(StudyError) as e:
        parse_study(doc(**changes))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_presets_load():
    names = preset_names()
    assert {"quick", "paper-autoencoder"} <= set(names)
    for n in names:
        s = load_study(n)
        assert s.reference in [c.name for c in s.configs]
    q = load_study("quick")
    assert all(c.device == "cpu" for c in q.configs) and len({c.threads for c in q.configs}) >= 2 and len(q.seeds) >= 3
    p = load_study("paper-autoencoder")
    assert {c.threads for c in p.configs if c.device == "cpu"} == {1, 4, 6}
    assert len(p.seeds) == 10
    gpu = {c.name: c for c in p.configs if c.is_gpu}
    assert any(not c.cudnn for c in gpu.values()) and any(c.deterministic for c in gpu.values())
    assert any(c.tf32 for c in gpu.values())


def test_load_study_errors(tmp_path):
    with pytest.raises(StudyError, match="neither a file nor a preset"):
        load_study("no-such-study")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study(bad)


def test_parse_overrides_reads_json_values_and_rejects_bare_keys():
    from devicediff.study import parse_overrides

    assert parse_overrides(["lr=1e-3", "sizes=[8, 4]", "data=clip.mp4", "x=true"]) == {
        "lr": 1e-3, "sizes": [8, 4], "data": "clip.mp4", "x": True}
    assert parse_overrides(None) == {}
    with pytest.raises(StudyError, match="write KEY=VALUE"):
        parse_overrides(["train_size"])


def test_study_directory_only_for_files(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[workload]\nname = \"autoencoder\"\n[[configs]]\nname = \"a\"\nreference = true\n")
    assert load_study(p).directory == tmp_path
    assert load_study("quick").directory is None


def test_new_options_keep_old_study_ids_and_parse():
    """Options added later (precision, packages, portable_random, snapshots, primary) appear in the
    identity only when set, so stores made before keep resuming."""
    doc = {"name": "s", "reference": "a", "workload": {"name": "autoencoder"}, "budget": {"epochs": 1},
           "configs": [{"name": "a"}, {"name": "b", "threads": 2}]}
    base = parse_study(doc)
    same = parse_study({**doc, "verdict": {"primary": ["eval_loss"]}, "snapshots": True})
    assert same.study_id == base.study_id and same.primary == ("eval_loss",)
    other = parse_study({**doc, "configs": [{"name": "a"}, {"name": "b", "precision": "bf16-autocast"}]})
    assert other.study_id != base.study_id and other.config("b").precision == "bf16-autocast"
    cell = parse_study({**doc, "seeds": {"count": 2, "vary": ["init", "dropout"]}}).cells()[-1]
    assert (cell.init_seed, cell.data_seed, cell.dropout_seed, cell.noise_seed) == (1, 0, 1, 0)


@pytest.mark.parametrize("cfg,needle", [
    ({"precision": "fp64"}, "precision: 'fp64' unknown"),
    ({"precision": "fp16-autocast"}, "fp16-autocast needs a GPU"),
    ({"compile": "fast"}, "compile: 'fast' unknown"),
    ({"cuda_graphs": True}, "cuda_graphs: only meaningful on a GPU"),
    ({"grad_noise": {"relative": 2.0}}, "grad_noise.relative: must be in (0, 1)"),
    ({"grad_noise": {"absolute": 1e-3}}, "grad_noise.absolute: unknown key"),
    ({"packages": ["-e ."]}, "is not a requirement"),
    ({"packages": ["torch==2.4.1"], "python": "/usr/bin/python3"}, "either python"),
    ({"framework": "chainer", "precision": "bf16-autocast"}, "chainer framework has no precision option"),
    ({"framework": "chainer", "params": {"frame_buffers": "shared"}}, "params.frame_buffers: 'shared' unknown"),
    ({"params": {"frame_buffers": "fresh"}}, "only ['chainer'] configs read it"),
])
def test_axes_are_checked_when_the_study_is_read(cfg, needle):
    doc = {"name": "s", "reference": "a", "workload": {"name": "autoencoder"}, "budget": {"epochs": 1},
           "configs": [{"name": "a"}, {"name": "b", **cfg}]}
    with pytest.raises(StudyError) as e:
        parse_study(doc)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_near_misses_are_named():
    from devicediff.errors import did_you_mean
    from devicediff.study import load_study

    assert did_you_mean("thread", ["threads", "device"]) == " (did you mean 'threads'?)"
    assert did_you_mean("zzz", ["threads", "device"]) == ""
    with pytest.raises(StudyError, match=r"'paper-autoencodr' is neither a file nor a preset \(did you mean 'paper-autoencoder'\?\)"):
        load_study("paper-autoencodr")
    with pytest.raises(StudyError, match=r"no config named 'cpu-1' \(did you mean 'cpu-1t'\?\)"):
        load_study("quick").config("cpu-1")
