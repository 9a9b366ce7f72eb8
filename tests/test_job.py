"""The typed job: one wire format, changed only through with_()."""

from __future__ import annotations

import dataclasses

import pytest

from devicediff.job import Job, Lockstep
from devicediff.runner import build_job
from devicediff.study import load_study


def test_json_round_trip_keeps_every_field(tmp_path):
    study = load_study("quick")
    job = build_job(study, study.cells()[1], "r1", tmp_path,
                    lockstep=Lockstep(steps=3, dir=str(tmp_path / "steps"), repeat="always", free=False))
    back = Job.from_json(job.to_json())
    assert back == job and isinstance(back.lockstep, Lockstep)
    assert back.checkpoint_path is None and back.snapshots is False  # a lockstep side keeps neither


def test_training_job_fields(tmp_path):
    study = load_study("quick")
    cell = study.cells()[1]
    job = build_job(study, cell, "r1", tmp_path)
    assert job.framework == "torch" and job.device == "cpu"
    assert (job.seed, job.init_seed, job.data_seed) == (cell.seed, cell.init_seed, cell.data_seed)
    assert job.checkpoint_path == str(tmp_path / "checkpoint.pt") and job.snapshots
    assert job.params == study.workload_params  # no per-config overrides in quick


def test_changes_make_a_new_job():
    job = Job(run_id="r", workload="w", config={"device": "cuda:3", "params": {"x": 1}}, init_seed=0,
              data_seed=0, budget={"steps": 1}, workload_params={"x": 0, "y": 2})
    moved = job.with_device("cuda:0")
    assert moved.device == "cuda:0" and job.device == "cuda:3"
    assert job.params == {"x": 1, "y": 2}  # the config's params override the study's
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.run_id = "other"


def test_lockstep_repeat_is_checked():
    with pytest.raises(ValueError, match="auto, always or never"):
        Lockstep(steps=1, dir=".", repeat="sometimes")
