"""The workload registry: one name map, twins, and parameters checked against typed signatures."""

from __future__ import annotations

import pytest

from devicediff.errors import ParamError, StudyError
from devicediff.workloads import builtin_name, check_params, make_workload, twin, twin_frameworks


class Typed:
    def __init__(self, *, n: int = 1, lr: float = 1e-3, flag: bool = False, sizes: list[int] = (1,),
                 name: str = "x", maybe: int | None = None, anything=None):
        pass


@pytest.mark.parametrize("params", [
    {"n": 3}, {"lr": 1}, {"lr": 0.5}, {"flag": True}, {"sizes": [4, 2]}, {"sizes": []}, {"name": "y"},
    {"maybe": None}, {"maybe": 2}, {"anything": object()},
])
def test_values_that_fit(params):
    check_params("typed", Typed, params)


@pytest.mark.parametrize("params,needle", [
    ({"n": 2.5}, "expected a whole number, got 2.5"),
    ({"n": True}, "expected a whole number, got True"),
    ({"n": "3"}, "expected a whole number, got '3'"),
    ({"lr": float("nan")}, "nan is not a finite number"),
    ({"lr": float("inf")}, "inf is not a finite number"),
    ({"lr": "fast"}, "expected a number, got 'fast'"),
    ({"flag": 1}, "expected true or false"),
    ({"sizes": "[1,2"}, "expected a list of a whole number"),
    ({"sizes": [1, 2.5]}, "expected a list of a whole number"),
    ({"maybe": "x"}, "expected a whole number or none"),
    ({"other": 1}, "unknown parameter"),
])
def test_values_that_do_not_fit_are_one_line(params, needle):
    with pytest.raises(ParamError) as e:
        check_params("typed", Typed, params)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_builtins_and_their_twins():
    assert builtin_name("devicediff.workloads.prednet:make") == "prednet"  # the old name still works
    assert twin("autoencoder", "chainer").endswith(":ChainerAutoencoder")
    assert twin("classifier", "chainer") is None and twin_frameworks("prednet") == ["chainer"]
    with pytest.raises(StudyError, match="unknown workload 'nope'"):
        make_workload("nope", {})


def test_a_factory_is_checked_through_its_workload_class():
    with pytest.raises(ParamError, match="workload.sizes"):
        make_workload("devicediff.workloads.autoencoder:make", {"sizes": "[1,2"})
