"""``portable_random = true`` in a PyTorch run (issue 18): the model's dropout swapped for portable
dropout keyed by the job's dropout seed, the same masks for every thread count, the counter carried
through a checkpoint, and nothing drawn on torch's generators."""

from __future__ import annotations

import io
import time

import pytest

torch = pytest.importorskip("torch")

from devicediff.frameworks import _driver  # noqa: E402
from devicediff.frameworks.torch.backend import TorchBackend  # noqa: E402
from devicediff.job import Job  # noqa: E402
from devicediff.portable.torch import Dropout, PortableRandom  # noqa: E402
from devicediff.protocol import RecordWriter, read_records  # noqa: E402

PARAMS = {"sizes": [16, 4], "batch_size": 20, "train_size": 200, "eval_size": 100, "dropout": 0.2}


def make_job(tmp_path, *, threads: int = 1, portable: bool = True, dropout_seed: int = 0, steps: int = 6,
             device: str = "cpu", **fields) -> Job:
    return Job(run_id="t", workload="autoencoder", config={"name": "c", "device": device, "threads": threads},
               init_seed=0, data_seed=0, budget={"steps": steps, "metric_every": 1}, workload_params=PARAMS,
               artifact_dir=str(tmp_path / "art"), snapshots=False, portable_random=portable,
               dropout_seed=dropout_seed, **fields)


def train(job: Job, on_backend=None) -> tuple[TorchBackend, list[dict]]:
    out = io.StringIO()
    b = TorchBackend(job, RecordWriter(out))
    if on_backend:
        on_backend(b)
    _driver.train(b, time.perf_counter())
    return b, list(read_records(out.getvalue().splitlines()))


def effective(records):
    return [r for r in records if r["kind"] == "effective"][-1]["settings"]


def final_sha(records) -> str:
    assert records[-1]["state"] == "finished", records[-1]
    return records[-1]["final_sha256"]


def first_masks(job: Job) -> list[torch.Tensor]:
    """The zero pattern of every dropout output during the run's first steps."""
    masks: list[torch.Tensor] = []

    def hook(b: TorchBackend) -> None:
        for m in b.model.drops:
            m.register_forward_hook(lambda m_, _i, out: masks.append(out.detach() == 0) if m_.training else None)

    train(job, hook)
    return masks


def test_dropout_swapped_and_recorded(tmp_path):
    b, recs = train(make_job(tmp_path))
    eff = effective(recs)
    assert eff["portable_random"] is True
    assert eff["portable_random_detail"]["swapped"] == ["drops.0: Dropout", "drops.1: Dropout", "drops.2: Dropout"]
    assert eff["portable_random_detail"]["not_swapped"] == []
    assert all(isinstance(m, Dropout) for m in b.model.drops)
    assert isinstance(b.portable, PortableRandom) and b.portable.step == 6  # advanced once per step
    # portable draws are integer arithmetic: nothing drew on torch's generators, nothing to warn
    assert eff["random_draws"] == {"generators": []} and eff["warnings"] == []


def test_masks_equal_for_one_and_two_threads(tmp_path):
    one = first_masks(make_job(tmp_path, threads=1))
    two = first_masks(make_job(tmp_path, threads=2))
    assert len(one) == len(two) == 6 * 3
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    assert any(a.any() for a in one)  # something was dropped


def test_dropout_seed_drives_the_masks(tmp_path):
    _, a = train(make_job(tmp_path, dropout_seed=0))
    _, again = train(make_job(tmp_path, dropout_seed=0))
    _, other = train(make_job(tmp_path, dropout_seed=1))
    _, device = train(make_job(tmp_path, portable=False))
    assert final_sha(a) == final_sha(again)
    assert len({final_sha(a), final_sha(other), final_sha(device)}) == 3


def test_checkpoint_resume_gives_the_uninterrupted_final_hash(tmp_path):
    job = make_job(tmp_path, steps=8)
    _, whole = train(job)
    ck = str(tmp_path / "ck.pt")
    job = job.with_(checkpoint_path=ck)
    b = TorchBackend(job, RecordWriter(io.StringIO()))
    for step, batch in _driver.batches_from(b.workload, job.data_seed, b.steps_per_epoch, 0, 4):
        b.train_step(step, batch)
    b.write_checkpoint(ck, 4)
    resumed_backend, resumed = train(job)
    assert resumed[-1]["resumed_from"] == 4
    assert resumed_backend.portable.step == 8
    assert final_sha(resumed) == final_sha(whole)


def test_a_checkpoint_without_portable_state_is_not_used(tmp_path):
    ck = str(tmp_path / "ck.pt")
    plain = make_job(tmp_path, portable=False, steps=8, checkpoint_path=ck)
    b = TorchBackend(plain, RecordWriter(io.StringIO()))
    b.write_checkpoint(ck, 4)
    _, recs = train(make_job(tmp_path, steps=8, checkpoint_path=ck))
    assert recs[-1]["resumed_from"] == 0  # set aside as unreadable, started over


def test_chainer_twin_refuses_dropout():
    pytest.importorskip("chainer")
    from devicediff.errors import ParamError
    from devicediff.workloads.autoencoder.chainer import ChainerAutoencoder

    with pytest.raises(ParamError, match="dropout"):
        ChainerAutoencoder({}, {"sizes": [16, 4], "batch_size": 20, "lr": 1e-3, "train_size": 200,
                                "eval_size": 100, "dropout": 0.2}, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_portable_masks_equal_the_cpus(tmp_path):
    cpu = first_masks(make_job(tmp_path))
    gpu = first_masks(make_job(tmp_path, device="cuda"))
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    _, recs = train(make_job(tmp_path, device="cuda"))
    assert effective(recs)["warnings"] == []


def test_compile_with_portable_random_is_skipped_with_the_reason(tmp_path):
    from devicediff.protocol import Skip

    job = make_job(tmp_path).with_(config={"name": "c", "device": "cpu", "threads": 1, "compile": True})
    with pytest.raises(Skip, match="portable_random"):
        TorchBackend(job, RecordWriter(io.StringIO()))
