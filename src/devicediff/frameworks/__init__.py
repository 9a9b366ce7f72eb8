"""Framework loops. Each runs inside a worker process and speaks the record
protocol (``devicediff.protocol``): ``torch_loop`` for PyTorch, ``chainer_loop``
for Chainer 7.8 in its own Python environment."""
