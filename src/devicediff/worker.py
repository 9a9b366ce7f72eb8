"""Entry point of one run's process: ``python -m devicediff.worker < job.json``.

The parent sets thread and library environment variables *before* this process
starts, so they are in force before any framework loads. The worker only
dispatches to the framework's loop and turns every failure into a ``done``
record: a crash is a result, not an exception in the parent.

Standard library only at import time (see ``devicediff.protocol``).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from importlib import import_module

from devicediff.protocol import FAILED, SKIPPED, RecordWriter, Skip

LOOPS = {
    "torch": "devicediff.frameworks.torch_loop",
    "chainer": "devicediff.frameworks.chainer_loop",
}


def run_job(job: dict, writer: RecordWriter) -> None:
    t0 = time.perf_counter()
    framework = job["config"].get("framework", "torch")
    try:
        loop = import_module(LOOPS[framework])
        loop.run(job, writer)
    except Skip as e:
        writer.emit("done", state=SKIPPED, error=str(e), wall_time=time.perf_counter() - t0)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a record
        tb = traceback.format_exc(limit=8)
        sys.stderr.write(tb)
        msg = f"{type(e).__name__}: {e}".strip()
        writer.emit("done", state=FAILED, error=msg[:2000], traceback=tb[-4000:], wall_time=time.perf_counter() - t0)


def main() -> None:
    job = json.loads(sys.stdin.read())
    writer = RecordWriter()
    writer.emit("started", pid=__import__("os").getpid())
    run_job(job, writer)


if __name__ == "__main__":
    main()
