"""What a run's Ray task asks for (pure; needs no Ray installed)."""

from __future__ import annotations

from devicediff.executors.base import Task
from devicediff.executors.ray import resource_request


def task(cpus: int = 1, gpus: int = 0, **ray_resources) -> Task:
    return Task(run_id="r", job={}, cpus=cpus, gpus=gpus, log_path="/tmp/x/worker.log", ray_resources=ray_resources)


NODES = [{"CPU": 16.0, "GPU": 1.0, "H100": 1.0}, {"CPU": 4.0}]


def test_cpu_run_asks_for_its_threads_and_no_gpu():
    assert resource_request(task(cpus=4), NODES) == {"num_cpus": 4, "num_gpus": 0, "resources": None}


def test_more_threads_than_any_node_get_a_whole_node():
    assert resource_request(task(cpus=64), NODES)["num_cpus"] == 16


def test_gpu_slots_split_one_gpu():
    assert resource_request(task(gpus=1), NODES)["num_gpus"] == 1
    assert resource_request(task(gpus=1), NODES, gpu_slots=4)["num_gpus"] == 0.25


def test_named_resource_pins_the_run_and_a_missing_one_is_a_reason():
    assert resource_request(task(gpus=1, H100=1), NODES)["resources"] == {"H100": 1}
    reason = resource_request(task(gpus=1, A100=1), NODES)
    assert isinstance(reason, str) and "A100" in reason and "start one" in reason
    assert isinstance(resource_request(task(gpus=1), [{"CPU": 8.0}]), str)
