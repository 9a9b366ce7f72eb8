"""Chainer 7.8, in its own environment (``env``: numpy<2, no torch): ``backend`` (a run),
``lockstep`` (the side of ``devicediff diverge``), ``common`` (what every Chainer workload twin
shares), ``init_export`` (initial weights built by PyTorch, loaded here) and ``gradients`` (the
reused-vs-fresh frame-buffer measurement of docs/replication.md). Importing this package loads
nothing."""
