"""Per-function localisation for Chainer (``frameworks/chainer/ops.py``): the reused frame buffer
of the original PredNet loop is named as the node whose saved input changed, a planted
single-node backward fault is named by the float64 replay, and the fresh-buffer loop has neither.

Runs in the Chainer environment (``chainer`` marker), on the tiny PredNet of test_chainer.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_chainer import TINY_PN, chainer_py, in_chainer, job  # noqa: F401 - chainer_py is a fixture

RECORD = """
import copy
from pathlib import Path
import numpy as np
import chainer
import chainer.functions as F
from chainer.functions.activation.tanh import Tanh
from devicediff.frameworks.chainer.backend import load_twin
from devicediff.frameworks.chainer.common import FrameFeeder
from devicediff.frameworks.chainer import ops
from devicediff.job import Job

class FaultyTanh(Tanh):
    # a float32 kernel fault: the backward is 0.1% too large in float32, right in float64
    def backward(self, indexes, grad_outputs):
        gx, = super().backward(indexes, grad_outputs)
        return (gx * 1.001,) if gx.dtype == np.float32 else (gx,)

tanh, calls = F.tanh, [0]
def planted(x):  # the third tanh of the step is the faulty one
    calls[0] += 1
    return FaultyTanh().apply((x,))[0] if calls[0] == 3 else tanh(x)

wl, model0, _ = load_twin(Job.from_dict(P["job"]), Path(P["dir"]) / "init")
batch = next(iter(wl.train_batches(0, 0)))
out = {}
for case, mode in (("reused", "reused"), ("fresh", "fresh"), ("planted", "fresh")):
    model = copy.deepcopy(model0)
    wl.reset_state()
    feed = FrameFeeder(mode, np)
    def run():
        model.cleargrads()
        loss = wl.loss(model, batch, feed)
        loss.backward()
        return loss
    F.tanh = planted if case == "planted" else tanh
    try:
        out[case] = ops.record(run, model, Path(P["dir"]) / case, 1)
    finally:
        F.tanh = tanh
print(json.dumps(out))
"""


@pytest.mark.chainer
def test_reused_buffer_planted_fault_and_true_negative(chainer_py, tmp_path):
    r = in_chainer(chainer_py, RECORD, {"job": job("prednet", TINY_PN, init_seed=1), "dir": str(tmp_path)})
    reused, fresh, planted = r["reused"], r["fresh"], r["planted"]
    assert reused["loss"] == fresh["loss"]  # the forward is right in both loops
    assert reused["grads_sha256"] != fresh["grads_sha256"]

    # reused buffers: the loss's saved target, read by its backward, is not what its forward saw
    fc = reused["first_changed"]
    assert fc["op"] == "MeanSquaredError" and fc["phase"] == "backward" and fc["kind"] == "input" and fc["index"] == 1
    assert fc["source"].startswith("devicediff/workloads/prednet/chainer.py:")
    assert "mean_squared_error" in fc["code"] and fc["max_abs_change"] > 0.1
    assert fc["nodes"] == TINY_PN["window"] - 1  # every frame's loss but the last one's
    entries = json.loads((tmp_path / "reused" / "ops.json").read_text())
    changed = [e for e in entries if e["changed_inputs"]]
    assert {e["op"] for e in changed} == {"MeanSquaredError"} and all(e["phase"] == "backward" for e in changed)
    # the float64 replay of those backwards (from their forward-time inputs) says the same
    suspects = [e for e in entries if e["suspect"]]
    assert {e["i"] for e in suspects} == {e["i"] for e in changed}
    assert reused["first_suspect"]["i"] == fc["i"]
    with np.load(tmp_path / "reused" / "ops.npz") as z:
        i = fc["i"]
        assert np.abs(z[f"{i}/input1@backward"] - z[f"{i}/input1@forward"]).max() == fc["max_abs_change"]

    # fresh buffers: nothing changed, nothing beyond rounding, every node replayed (true negative)
    assert fresh["changed"] == 0 and fresh["suspect"] == 0 and fresh["not_replayed"] == 0, fresh["line"]
    assert fresh["forward"] == reused["forward"] > 100 and fresh["backward"] > 100
    assert not (tmp_path / "fresh" / "ops.npz").exists()
    fe = json.loads((tmp_path / "fresh" / "ops.json").read_text())
    assert max(e["ratio"] for e in fe) < 0.5  # margin below the bound
    assert {"i", "phase", "op", "module", "source", "shapes", "dtypes", "own_error", "bound", "changed_inputs",
            "note"} <= set(fe[0])
    conv = next(e for e in fe if e["op"] == "Convolution2DFunction")
    assert conv["module"] == "layers.0.conv_a" and conv["params"] == ["layers.0.conv_a.weight", "layers.0.conv_a.bias"]

    # planted: the one faulty backward is the one suspect; its forward is fine
    assert planted["changed"] == 0 and planted["suspect"] == 1, planted["line"]
    fs = planted["first_suspect"]
    assert fs["op"] == "FaultyTanh" and fs["phase"] == "backward" and 100 < fs["ratio"] < 1e5
    pe = json.loads((tmp_path / "planted" / "ops.json").read_text())
    assert not pe[fs["forward"]]["suspect"] and pe[fs["forward"]]["op"] == "FaultyTanh"


LOCKSTEP = """
import io
import numpy as np
from devicediff.frameworks import _driver
from devicediff.frameworks.chainer.backend import ChainerBackend
from devicediff.frameworks.chainer.lockstep import ChainerLockstep
from devicediff.frameworks.chainer.ops import grads_sha256
from devicediff.job import Job
from devicediff.protocol import RecordWriter

side = ChainerLockstep(ChainerBackend(Job.from_dict(P["job"]), RecordWriter(io.StringIO())))
batches = _driver.endless_batches(side.backend.workload, 0)
for step in (1, 2):  # step 2 carries the recurrent state of step 1's window
    batch, lr = next(batches), side.learning_rate(step - 1)
    side.teacher_sync()
    carried = side.carried_state()
    first = side.step(step, batch, lr)
    if step == 1:  # at step 2 the reference keeps the step's starting state, as before the driver's repeat
        side.reference_step(step, batch, lr)
try:  # after the step's update: not the step's starting state
    side.record_ops(2, batch, lr, P["dir"])
    refused = ""
except RuntimeError as e:
    refused = str(e)
side.teacher_sync()
side.restore_carried(carried)
summary = side.record_ops(2, batch, lr, P["dir"])
again = side.step(2, batch, lr)  # record_ops left the state as it found it
same = sorted(first) == sorted(again) and all(np.array_equal(first[k], again[k]) for k in first)
grads = {k.partition("/")[2]: a for k, a in first.items() if k.startswith("grad/")}
print(json.dumps({"summary": summary, "refused": refused, "same": same,
                  "loss": float(first["loss/loss"]), "grads_sha256": grads_sha256(grads)}))
"""


@pytest.mark.chainer
def test_lockstep_record_ops_is_the_step(chainer_py, tmp_path):
    j = job("prednet", {**TINY_PN, "frame_buffers": "reused"}, init_seed=1, threads=1)
    j.update(artifact_dir=str(tmp_path / "run"), lockstep={"steps": 2, "dir": str(tmp_path / "steps"), "free": False})
    r = in_chainer(chainer_py, LOCKSTEP, {"job": j, "dir": str(tmp_path / "steps")})
    s = r["summary"]
    assert "not at the teacher-forced state" in r["refused"]
    assert r["same"]
    assert s["loss"] == r["loss"] and s["grads_sha256"] == r["grads_sha256"]  # the step's arithmetic
    assert s["step"] == 2 and s["first_changed"]["op"] == "MeanSquaredError"
    assert (tmp_path / "steps" / "ops.json").is_file()
