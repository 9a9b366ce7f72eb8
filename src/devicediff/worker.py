"""Entry point of one run's process: ``python -m devicediff.worker < job.json``.

The parent sets thread and library environment variables *before* this process
starts, so they are in force before any framework loads. The worker builds the
config's framework backend (``devicediff.frameworks``), hands it to the one
training driver (or the lockstep driver for ``devicediff diverge``), and turns
every failure into a ``done`` record: a crash is a result, not an exception in
the parent.

Standard library only at import time (see ``devicediff.protocol``).
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from devicediff.job import Job
from devicediff.protocol import FAILED, SKIPPED, RecordWriter, Skip


def run_job(job: Job, writer: RecordWriter) -> None:
    from devicediff import frameworks
    from devicediff.frameworks import _driver

    t0 = time.perf_counter()
    try:
        fw = frameworks.get(job.framework)
        backend = fw.make_backend(job, writer)
        if job.lockstep is not None:
            _driver.lockstep(fw.make_lockstep(backend), t0)
        else:
            _driver.train(backend, t0)
    except Skip as e:
        writer.emit("done", state=SKIPPED, error=str(e), wall_time=time.perf_counter() - t0)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a record
        tb = traceback.format_exc(limit=8)
        sys.stderr.write(tb)
        msg = f"{type(e).__name__}: {e}".strip()
        writer.emit("done", state=FAILED, error=msg[:2000], traceback=tb[-4000:], wall_time=time.perf_counter() - t0)


def main() -> None:
    job = Job.from_json(sys.stdin.read())
    writer = RecordWriter()
    writer.emit("started", pid=os.getpid())
    run_job(job, writer)


if __name__ == "__main__":
    main()
