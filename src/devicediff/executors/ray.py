"""Ray executor: every run is a Ray task on some node of a cluster.

``devicediff run STUDY --executor ray [--address HOST:PORT]``

- A run's task asks Ray for its CPUs (the config's ``threads``; capped at the
  largest node's CPU count), one GPU for a GPU config (``1/N`` of one with
  ``--gpu-slots N``, so N runs share a card), and the config's
  ``ray_resources`` (e.g. ``{H100 = 1}`` for a node started with
  ``ray start --resources='{"H100": 1}'``). A run that no node of the cluster
  can ever hold is recorded as ``skipped`` with the reason, not left waiting.
- On its node the task starts the same worker subprocess as the local
  executor (``run_worker``/``worker_env``), with ``CUDA_VISIBLE_DEVICES`` as
  Ray assigned it (the job's ``cuda:N`` becomes ``cuda:0``; the run's
  ``effective.placement`` records node, GPU ids and the device asked for).
- The task streams the worker's records back to the driver (a Ray streaming
  generator); only the driver writes the store.
- A node that cannot see the driver's artifact folder (no shared file system)
  works in a local temporary folder and ships weight snapshots, artifacts and
  the worker log back with the records. Checkpoints stay on that node.

Ray is optional (``pip install "ray[default]"``): this module imports without
it, and asking for it without it installed is a one-line usage error.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from devicediff.errors import UsageError
from devicediff.executors.base import Executor, Task, worker_env
from devicediff.executors.local import kill_worker, place_job, run_worker
from devicediff.job import Job
from devicediff.protocol import FAILED, SKIPPED

INSTALL_HINT = ('--executor ray needs Ray, which is not installed here; install it with '
                'pip install "ray[default]" (or pip install "devicediff[ray]")')
TOKEN_FILE = ".driver-token"
MAX_LOG_BYTES = 1 << 20


def import_ray():
    try:
        import ray  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


def host_port(address: str) -> tuple[str, int] | None:
    """``"ray://h:10001"`` or ``"h:6379"`` → ``(h, port)``; ``auto``/``local`` → None."""
    a = address.strip()
    if a in ("auto", "local") or not a:
        return None
    if "://" in a:
        a = a.split("://", 1)[1]
    a = a.rstrip("/")
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when nothing listens at ``address``."""
    hp = host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as e:
        if isinstance(e, socket.timeout):
            reason = f"no answer in {timeout:g} s"
        else:
            reason = (e.strerror or type(e).__name__).lower()
        raise UsageError(
            f"cannot reach the Ray cluster at {address} ({reason}); start it with `ray start --head` "
            "or check --address"
        ) from None


def _fits(have: dict, need: dict) -> bool:
    return all(have.get(k, 0) >= v for k, v in need.items() if v)


def resource_request(task: Task, nodes: list[dict], gpu_slots: int = 1) -> dict | str:
    """What a run's task asks Ray for: ``{"num_cpus", "num_gpus", "resources"}``,
    or the reason no node of the cluster (``nodes``: each node's resources) can ever hold it.

    A GPU run asks for ``1 / gpu_slots`` of a GPU, so ``gpu_slots`` runs share one card
    (Ray then gives each the same ``CUDA_VISIBLE_DEVICES``). A run asking for more
    threads than any fitting node has gets a whole node's CPUs.
    """
    others = {k: v for k, v in task.ray_resources.items() if k not in ("CPU", "GPU")}
    gpus = task.gpus / gpu_slots if task.gpus else 0
    need = {"CPU": 1, "GPU": gpus, **others}
    hosts = [n for n in nodes if _fits(n, need)]
    if not hosts:
        want = {k: v for k, v in need.items() if v}
        return f"no node of the Ray cluster offers {want}; start one with those resources"
    cpus = min(max(1, task.cpus), int(max(n.get("CPU", 1) for n in hosts)))
    return {"num_cpus": cpus, "num_gpus": gpus, "resources": others or None}


# -- on the node -------------------------------------------------------------------------


def _same_filesystem(run_dir: str, token: str) -> bool:
    try:
        return Path(run_dir, TOKEN_FILE).read_text() == token
    except OSError:
        return False


def node_run(payload: dict) -> Iterator[list[dict]]:
    """Body of a run's Ray task (a streaming generator): start the worker here and
    yield its records in batches as they come."""
    import ray

    job = Job.from_json(payload["job"])
    run_dir = payload["run_dir"]
    shared = _same_filesystem(run_dir, payload["token"])
    log_path = payload["log_path"]
    if not shared:
        local = Path(tempfile.gettempdir()) / "devicediff-ray" / payload["run_id"]
        local.mkdir(parents=True, exist_ok=True)
        ckpt = Path(job.checkpoint_path).name if job.checkpoint_path else None
        job = job.with_(artifact_dir=str(local), checkpoint_path=str(local / ckpt) if ckpt else None)
        log_path = str(local / "worker.log")
    gpu = None
    if job.device.startswith("cuda"):
        ids = [str(i) for i in ray.get_gpu_ids()]
        gpu = ",".join(ids) if ids else None
    job, note = place_job(job, gpu)
    ctx = ray.get_runtime_context()
    placement = {
        "executor": "ray", **note, "cores": None, "node_ip": ray.util.get_node_ip_address(),
        "node_id": ctx.get_node_id(), "cpus": payload["cpus"], "gpu_share": payload.get("gpu_share", 0),
        "ray_resources": payload["ray_resources"],
        "shared_filesystem": shared,
    }
    env = worker_env(job, gpu_index=gpu)
    task = Task(run_id=payload["run_id"], job=job, cpus=payload["cpus"], gpus=payload["gpus"], log_path=log_path,
                python=payload["python"] or sys.executable)
    q: queue.Queue = queue.Queue()
    procs: list = []

    def body() -> None:
        try:
            run_worker(task, env, None, q.put, on_start=procs.append)
        except BaseException as e:  # noqa: BLE001
            q.put({"kind": "done", "state": FAILED, "error": f"ray task: {type(e).__name__}: {e}"})
        finally:
            q.put(None)

    # The worker dies with this thread (PR_SET_PDEATHSIG), i.e. when Ray ends the task's process.
    threading.Thread(target=body, daemon=True, name=f"run-{task.run_id}").start()
    try:
        yield [{"kind": "effective", "settings": {"placement": placement}}]
        yield from _stream(q, placement, shared)
    finally:  # cancelled, or the driver went away: the worker must not outlive its task
        for proc in procs:
            kill_worker(proc)
    if not shared:
        try:
            with open(log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - MAX_LOG_BYTES))
                yield [{"kind": "_log", "data": f.read()}]
        except OSError:
            pass
        if not (job.checkpoint_path and Path(job.checkpoint_path).exists()):  # keep only what a resumed run could use
            shutil.rmtree(job.artifact_dir, ignore_errors=True)


def _stream(q: queue.Queue, placement: dict, shared: bool) -> Iterator[list[dict]]:
    """The worker's records in batches as they arrive, with the placement and any files added."""
    end = False
    while not end:
        items = [q.get()]
        while True:
            try:
                items.append(q.get_nowait())
            except queue.Empty:
                break
        batch = []
        for rec in items:
            if rec is None:
                end = True
                continue
            if rec.get("kind") == "effective" and isinstance(rec.get("settings"), dict):
                rec = {**rec, "settings": {**rec["settings"], "placement": placement}}
            if not shared and rec.get("kind") in ("weights", "artifact") and rec.get("path"):
                try:
                    rec = {**rec, "_file": Path(rec["path"]).read_bytes()}
                except OSError:
                    pass
            batch.append(rec)
        if batch:
            yield batch


# -- on the driver -------------------------------------------------------------------------


class RayExecutor(Executor):
    """Connects at construction, so an unreachable cluster fails before the store is touched."""

    def __init__(self, address: str | None = None, *, slots_per_gpu: int = 1, ship_files: bool = False):
        """``slots_per_gpu``: GPU runs sharing one GPU (each asks Ray for that fraction of one);
        ``ship_files=True`` ships files back even when the node shares the driver's folder."""
        if slots_per_gpu < 1:
            raise ValueError("slots_per_gpu must be at least 1")
        self.gpu_slots = slots_per_gpu
        ray = import_ray()
        if address:
            check_reachable(address)
        try:
            if not ray.is_initialized():
                self._init(ray, address)
                self._owns = True
            else:
                self._owns = False
        except Exception as e:  # noqa: BLE001 - ray raises many kinds; all mean "no cluster"
            where = f"at {address}" if address else "(local)"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"cannot connect to the Ray cluster {where}: {first[:300]}; "
                               "check --address and that `ray status` works there") from None
        self.ray = ray
        self.address = address
        self.ship_files = ship_files
        self._remote = ray.remote(num_returns="streaming")(node_run)
        self._gens: list = []

    @staticmethod
    def _init(ray, address: str | None) -> None:
        """``ray.init`` with its C++ chatter (retry warnings written straight to fd 2)
        kept out of the terminal unless the connection succeeds."""
        import logging

        kw = {} if address else {"include_dashboard": False}
        with tempfile.TemporaryFile() as captured:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(captured.fileno(), 2)
            ok = False
            try:
                ray.init(address=address or None, log_to_driver=False, logging_level=logging.ERROR, **kw)
                ok = True
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                if ok:
                    captured.seek(0)
                    chatter = captured.read().decode(errors="replace").strip()
                    if chatter:
                        print(chatter, file=sys.stderr)

    def _nodes(self) -> list[dict]:
        return [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]

    def execute(self, tasks: list[Task]) -> Iterator[tuple[Task, dict]]:
        ray = self.ray
        nodes = self._nodes()
        out: queue.Queue = queue.Queue()
        active = 0

        def consume(task: Task, gen) -> None:
            done = False
            try:
                for ref in gen:
                    for rec in ray.get(ref):
                        done = done or rec.get("kind") == "done"
                        out.put((task, rec))
                if not done:
                    out.put((task, {"kind": "done", "state": FAILED, "error": "ray task ended without a result"}))
            except Exception as e:  # noqa: BLE001 - node lost, task killed, worker crash...
                if not done:
                    msg = str(e).strip().splitlines()
                    out.put((task, {"kind": "done", "state": FAILED,
                                    "error": f"ray task failed: {type(e).__name__}: {(msg[-1] if msg else '')[:500]}"}))
            finally:
                try:
                    Path(task.log_path).parent.joinpath(TOKEN_FILE).unlink()
                except OSError:
                    pass
                out.put((task, None))

        try:
            for task in tasks:
                request = resource_request(task, nodes, self.gpu_slots)
                if isinstance(request, str):
                    yield task, {"kind": "done", "state": SKIPPED, "error": request}
                    continue
                cpus = request["num_cpus"]
                run_dir = str(Path(task.log_path).parent)
                token = secrets.token_hex(8)
                Path(run_dir, TOKEN_FILE).write_text(token)
                if self.ship_files:
                    token = "ship"
                payload = {
                    "run_id": task.run_id, "job": task.job.to_json(), "cpus": cpus, "gpus": task.gpus, "gpu_share": request["num_gpus"],
                    "log_path": task.log_path,
                    "run_dir": run_dir, "token": token, "ray_resources": dict(task.ray_resources),
                    "python": None if task.python == sys.executable else task.python,
                }
                gen = self._remote.options(
                    **request, max_retries=0,
                    name=f"devicediff {task.label or task.run_id}",
                ).remote(payload)
                self._gens.append(gen)
                active += 1
                threading.Thread(target=consume, args=(task, gen), daemon=True, name=f"ray-{task.run_id}").start()
            while active:
                task, rec = out.get()
                if rec is None:
                    active -= 1
                    continue
                rec = self._land_files(task, rec)
                if rec is not None:
                    yield task, rec
        finally:
            if active:  # closed early (the driver failed or was interrupted): stop the rest
                self.cancel_all()
            self._gens = []

    @staticmethod
    def _land_files(task: Task, rec: dict) -> dict | None:
        """Write files shipped from a node without the shared folder beside the driver's store."""
        run_dir = Path(task.log_path).parent
        if rec.get("kind") == "_log":
            Path(task.log_path).write_bytes(rec["data"])
            return None
        if "_file" in rec:
            data = rec.pop("_file")
            dest = run_dir / Path(rec["path"]).name
            dest.write_bytes(data)
            rec = {**rec, "path": str(dest)}
        return rec

    def cancel_all(self) -> None:
        for gen in self._gens:
            try:
                self.ray.cancel(gen, force=True)
            except Exception:  # noqa: BLE001 - finished already, or not cancellable
                pass
        self._gens = []

    def close(self) -> None:
        self.cancel_all()
        if getattr(self, "_owns", False) and self.ray.is_initialized():
            self.ray.shutdown()
