"""devicediff: does the hardware or software configuration change what my network learns?

Library use::

    from devicediff import load_study, open_store, run_study
    study = load_study("quick")
    with open_store("devicediff.db") as store:
        run_study(study, store)

In a notebook (docs/notebook.md)::

    store = open_store("devicediff.db", readonly=True)
    store.runs(), store.metrics(), store.verdicts()   # pandas DataFrames
"""

__version__ = "0.2.0"

from devicediff.spec import Batch, Workload, epoch_order  # noqa: E402
from devicediff.study import ExecConfig, Study, StudyError, load_study, parse_study  # noqa: E402


def __getattr__(name):  # lazy: keep `import devicediff` light (no pandas/torch)
    if name == "run_study":
        from devicediff.runner import run_study

        return run_study
    if name == "open_store":
        return _open_store
    raise AttributeError(name)


def _open_store(url: str = "devicediff.db", *, create: bool = True, readonly: bool = False):
    """A store with the notebook API: ``runs()``, ``metrics()``, ``verdicts()`` (pandas DataFrames)."""
    from devicediff.analysis.load import StoreView
    from devicediff.store import open_store

    return StoreView(open_store(url, create=create, readonly=readonly))


__all__ = ["Batch", "Workload", "epoch_order", "ExecConfig", "Study", "StudyError", "load_study", "parse_study", "run_study", "open_store"]
