"""Studies are identified by content: a name the store already holds for another definition is
refused where the study is put, with the first differing field and the way out."""

from __future__ import annotations

import pytest
from study_store import fill, make_study

from devicediff.errors import StudyError
from devicediff.store import SQLiteStore
from devicediff.store.identity import definition_hash, differences


def test_a_different_study_under_a_stored_name_is_refused_and_nothing_is_written(tmp_path):
    db = tmp_path / "s.db"
    with SQLiteStore(db) as s:
        fill(s, make_study("quick"))
        before = (s.studies()[["study_id", "name"]].values.tolist(), len(s.runs()))
        other = make_study("quick", train_size=3000)
        with pytest.raises(StudyError) as e:
            s.put_study(other.study_id, other.name, other.to_dict())
        msg = str(e.value)
        assert "\n" not in msg and "'quick'" in msg and str(db) in msg
        assert "workload_params.train_size: 3000 vs None" in msg
        assert "--name NEW" in msg and "--store" in msg
        assert (s.studies()[["study_id", "name"]].values.tolist(), len(s.runs())) == before


def test_the_same_study_again_or_with_more_seeds_is_not_a_conflict(tmp_path):
    with SQLiteStore(tmp_path / "s.db") as s:
        st = make_study("q", seeds=2)
        s.put_study(st.study_id, st.name, st.to_dict())
        s.put_study(st.study_id, st.name, st.to_dict())
        more = make_study("q", seeds=5)  # seeds are not identity: same id
        assert more.study_id == st.study_id
        s.put_study(more.study_id, more.name, more.to_dict())
        other = make_study("other-name", train_size=3000)  # another name: no conflict
        s.put_study(other.study_id, other.name, other.to_dict())
        assert len(s.studies()) == 2


def test_check_study_names_the_first_differing_field_of_nested_configs():
    a = make_study("q").to_dict()
    b = make_study("q", configs=("cpu-1t", "cpu-2t")).to_dict()
    b["configs"][1]["threads"] = 4
    diffs = differences(b, a)
    assert diffs[0] == ("configs.cpu-2t.threads", 4, 2)
    assert differences(a, {**a, "seeds": [9], "description": "x"}) == []  # not identity
    assert definition_hash(a) == definition_hash({**a, "seeds": [7]}) != definition_hash(b)


def test_the_check_is_available_without_writing(tmp_path):
    with SQLiteStore(tmp_path / "s.db") as s:
        st = make_study("q")
        s.put_study(st.study_id, st.name, st.to_dict())
        other = make_study("q", epochs=2)
        with pytest.raises(StudyError, match=r"budget\.epochs: 2 vs 1"):
            s.check_study(other.study_id, other.name, other.to_dict())
        s.check_study(st.study_id, st.name, st.to_dict())  # itself: fine


def test_cli_run_of_another_definition_under_a_stored_name_is_one_line(tmp_path, tiny_study):
    from conftest import devicediff

    db = tmp_path / "s.db"
    with SQLiteStore(db) as s:
        fill(s, make_study("tiny"))  # the name of tiny_study, another definition
    before = sorted(p.name for p in tmp_path.iterdir())
    r = devicediff("run", str(tiny_study("tiny", seeds=1)), "--store", str(db), "-q", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("devicediff: error: study 'tiny' is already in store") and "--name NEW" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["tiny.toml"])
    with SQLiteStore(db, readonly=True) as s:
        assert len(s.studies()) == 1 and len(s.runs()) == 6
