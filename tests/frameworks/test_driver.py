"""The one training driver's schedule and checkpoint rules (frameworks/_driver.py), framework-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from devicediff.frameworks import _driver
from devicediff.job import Job


class Counting:
    """A workload stand-in: epoch e yields batches (e, 0), (e, 1), ... of a fixed count."""

    def __init__(self, per_epoch: int):
        self.per_epoch = per_epoch
        self.resets = 0

    def train_batches(self, data_seed, epoch):
        return [(epoch, i) for i in range(self.per_epoch)]

    def reset_state(self):
        self.resets += 1


@dataclass
class Sched:
    total_steps: int
    steps_per_epoch: int
    budget: dict = field(default_factory=dict)

    @property
    def job(self):
        return Job(run_id="r", workload="w", config={}, init_seed=0, data_seed=0, budget=self.budget)


def test_batches_resume_inside_an_epoch():
    wl = Counting(per_epoch=4)
    got = list(_driver.batches_from(wl, 0, 4, step=6, total=10))
    assert got == [(6, (1, 2)), (7, (1, 3)), (8, (2, 0)), (9, (2, 1))]


def test_endless_batches_refuse_an_empty_workload():
    import pytest

    with pytest.raises(RuntimeError, match="no batches"):
        next(_driver.endless_batches(Counting(per_epoch=0), 0))


def test_evaluation_and_checkpoint_schedule():
    s = Sched(total_steps=12, steps_per_epoch=4)
    assert [k for k in range(13) if _driver.eval_due(s, k)] == [0, 4, 8, 12]
    assert [k for k in range(1, 13) if _driver.checkpoint_due(s, k)] == [4, 8]  # epoch ends, never the last step
    s = Sched(total_steps=12, steps_per_epoch=4, budget={"eval_every_steps": 5, "checkpoint_every": 3})
    assert [k for k in range(1, 13) if _driver.eval_due(s, k)] == [5, 10, 12]
    assert [k for k in range(1, 13) if _driver.checkpoint_due(s, k)] == [3, 6, 9]
    one_epoch = Sched(total_steps=4, steps_per_epoch=4)
    assert not any(_driver.checkpoint_due(one_epoch, k) for k in range(5))  # single-epoch runs: no checkpoints


class FakeCheckpoints:
    def __init__(self, tmp: Path, step_in_file: int):
        self.job = Job(run_id="r", workload="w", config={}, init_seed=0, data_seed=0, budget={},
                       checkpoint_path=str(tmp / "ckpt"))
        self.total_steps, self.workload, self.restored = 10, Counting(1), False
        self.step_in_file = step_in_file

    def write_checkpoint(self, path, step):
        Path(path).write_text(str(step))

    def read_checkpoint(self, path):
        step = int(Path(path).read_text())

        def restore():
            self.restored = True

        return step, restore


def test_checkpoint_outside_the_budget_is_set_aside_untouched(tmp_path, monkeypatch):
    monkeypatch.delenv("DEVICEDIFF_PARENT_PID", raising=False)
    b = FakeCheckpoints(tmp_path, 0)
    _driver.save_checkpoint(b, 12)  # a step the run cannot resume from (total is 10)
    assert _driver.load_checkpoint(b) == 0 and not b.restored
    assert (tmp_path / "ckpt.unreadable").exists()
    _driver.save_checkpoint(b, 4)
    assert _driver.load_checkpoint(b) == 4 and b.restored and b.workload.resets == 1
