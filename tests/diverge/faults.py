"""Planted faults for ``devicediff diverge`` (tests/diverge/test_faults.py): a user's own workload
whose config B plants one fault through ``params``, each written the way users write them.

``make(**params)``: an MLP ``fc1 (Linear) → bn (BatchNorm1d) → ReLU → fc2 (Linear) → ReLU → fc3``
on synthetic regression data (no files needed), Adam. ``fault``:

========================  =====================================================================
``none``                  nothing
``tensor_hook``           ``fc2.weight.register_hook(lambda g: g * 1.001)`` in ``build_model``
``forward_hook``          a forward hook on ``fc2`` scaling its output by 1.001
``backward_hook``         a full backward hook on ``fc2`` scaling the gradient of its input by 1.001
``global_flag``           a module-level flag set in ``build_model`` and read by ``forward``: fc2's
                          output times 1.001
``weight_decay``          Adam with ``weight_decay = 1e-2`` (optimizer only)
``bn_momentum``           BatchNorm momentum 0.12 instead of 0.1 (running statistics only)
``adam_beta2``            Adam ``betas = (0.9, 0.99)`` instead of 0.999 (optimizer state only)
``tiny_eps``              fc2's output times (1 + 1e-9): below float32 resolution (a true negative)
``late_scale``            from step ``fault_from`` on (read from the batch), fc2's output times 1.001
``foreach``               Adam(foreach=True): the multi-tensor kernels PyTorch picks on a GPU, here on
                          the CPU (not a fault: the same update through other operations)
========================  =====================================================================

``dropout = p`` adds ``nn.Dropout(p)`` (module ``drop``) after the BatchNorm's ReLU (issue 18).
``slope = s`` makes the second activation ``nn.LeakyReLU(s)`` (module ``act``): two configs with
other slopes differ in that one operation (the operation-level tests, tests/diverge/test_ops.py).
``inplace = true`` applies the first ReLU in place (``torch.relu_``): other operations, the same
mathematics.

``prednet_gate(**params)``: the tiny chainer-lineage PredNet with a single perturbed operation
inside the ConvLSTM gates (``fault = "gate_slope"``): the forget gate's pre-activation
``torch.addcmul(z_f, peephole_f, c_prev)`` comes out 0.1% larger (a torch function mode entered
around the model's forward).
"""

from __future__ import annotations

import torch
from torch import nn

from devicediff.spec import Batch, Workload

FAULTS = ("none", "tensor_hook", "forward_hook", "backward_hook", "global_flag", "weight_decay", "bn_momentum",
          "adam_beta2", "tiny_eps", "late_scale", "foreach")
FLAGS = {"gain": 1.0}  # the global flag of ``global_flag``: read at call time


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, momentum: float, fault: str, dropout: float = 0.0, slope: float = 0.0,
                 inplace: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden, momentum=momentum)
        if dropout:
            self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_in)
        if slope:
            self.act = nn.LeakyReLU(slope)
        self.fault, self.inplace = fault, inplace
        self.late = False  # set per batch by the workload (late_scale)

    def forward(self, x):
        h = self.bn(self.fc1(x))
        h = torch.relu_(h) if self.inplace else torch.relu(h)
        if hasattr(self, "drop"):
            h = self.drop(h)
        h = self.fc2(h) * FLAGS["gain"]
        if self.fault == "tiny_eps":
            h = h * (1 + 1e-9)
        if self.fault == "late_scale" and self.late:
            h = h * 1.001
        return self.fc3(self.act(h) if hasattr(self, "act") else torch.relu(h))


class Faulty(Workload):
    name = "faulty-mlp"

    def __init__(self, *, fault: str = "none", fault_from: int = 1, n: int = 512, d_in: int = 16, hidden: int = 32,
                 batch_size: int = 64, lr: float = 1e-3, dropout: float = 0.0, slope: float = 0.0,
                 inplace: bool = False):
        self.dropout, self.slope, self.inplace = float(dropout), float(slope), bool(inplace)
        if fault not in FAULTS:
            raise ValueError(f"fault {fault!r}: one of {FAULTS}")
        self.fault, self.fault_from, self.batch_size, self.lr = fault, int(fault_from), int(batch_size), float(lr)
        self.d_in, self.hidden = int(d_in), int(hidden)
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, d_in, generator=g)
        w = torch.randn(d_in, d_in, generator=g) / d_in**0.5
        self.y = torch.tanh(self.x @ w) + 0.1 * torch.randn(n, d_in, generator=g)

    def describe(self):
        return {"fault": self.fault, "fault_from": self.fault_from, "dropout": self.dropout, "slope": self.slope,
                "inplace": self.inplace,
                "randomness": "nn.Dropout on the device generator" if self.dropout else "none"}

    def build_model(self, init_seed: int):
        model = MLP(self.d_in, self.hidden, 0.12 if self.fault == "bn_momentum" else 0.1, self.fault, self.dropout,
                    self.slope, self.inplace)
        FLAGS["gain"] = 1.001 if self.fault == "global_flag" else 1.0
        if self.fault == "tensor_hook":
            model.fc2.weight.register_hook(lambda g: g * 1.001)
        elif self.fault == "forward_hook":
            model.fc2.register_forward_hook(lambda m, i, o: o * 1.001)
        elif self.fault == "backward_hook":
            model.fc2.register_full_backward_hook(lambda m, gi, go: (gi[0] * 1.001,))
        return model

    def make_optimizer(self, model):
        if self.fault == "weight_decay":
            return torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=1e-2)
        if self.fault == "adam_beta2":
            return torch.optim.Adam(model.parameters(), lr=self.lr, betas=(0.9, 0.99))
        if self.fault == "foreach":
            return torch.optim.Adam(model.parameters(), lr=self.lr, foreach=True)
        return torch.optim.Adam(model.parameters(), lr=self.lr)

    def steps_per_epoch(self) -> int:
        return len(self.x) // self.batch_size

    def train_batches(self, data_seed: int, epoch: int):
        from devicediff.spec import epoch_order

        order = torch.from_numpy(epoch_order(data_seed, epoch, len(self.x)))
        for i in range(self.steps_per_epoch()):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            step = epoch * self.steps_per_epoch() + i + 1  # 1-based global step
            yield Batch({"x": self.x[idx], "y": self.y[idx], "step": torch.tensor(step)})

    def loss(self, model, batch: Batch):
        d = batch.data
        model.late = self.fault == "late_scale" and int(d["step"]) >= self.fault_from
        return torch.mean((model(d["x"]) - d["y"]) ** 2)

    def evaluate(self, model, device):
        x, y = self.x[:128].to(device), self.y[:128].to(device)
        return {"eval_loss": float(torch.mean((model(x) - y) ** 2))}


def make(**params) -> Faulty:
    return Faulty(**params)


class _GateSlope(torch.overrides.TorchFunctionMode):
    """The forget gate's pre-activation ``torch.addcmul(z_f, peephole_f, c_prev)`` comes out 0.1%
    larger: one operation site inside the ConvLSTM, everything else untouched."""

    def __init__(self, peepholes: set[int]):
        super().__init__()
        self.peepholes = peepholes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.addcmul and len(args) > 1 and id(args[1]) in self.peepholes:
            out = out * 1.001
        return out


def prednet_gate(*, fault: str = "none", **params):
    from devicediff.workloads.prednet import PredNetWorkload

    class GateFault(PredNetWorkload):
        def build_model(self, init_seed: int):
            model = super().build_model(init_seed)
            if fault == "gate_slope":
                mode = _GateSlope({id(layer.peephole_f) for layer in model.layers if layer.has_peepholes})

                def enter(_m, _args):
                    mode.__enter__()  # a pre-hook's return value would replace the inputs

                def leave(_m, _args, _out):
                    mode.__exit__(None, None, None)

                model.register_forward_pre_hook(enter)
                model.register_forward_hook(leave)
            return model

    return GateFault(**params)
