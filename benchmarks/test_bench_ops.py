"""pytest-benchmark: fused vs naive for every case of benchmarks/cases.py that is
not marked big (the table script covers the largest shapes). Times only: speed
and memory targets are read from `make bench`, never asserted here."""
import pytest
import torch

from benchmarks.cases import all_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [c for c in all_cases(DEVICE) if not c.big or DEVICE.type == "cuda"]
BACKWARD_CASES = [c for c in CASES if c.backward]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", ["naive", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op.replace(' ', '_')}-{c.shape.replace(' ', '')}" for c in CASES])
def test_forward(benchmark, case, impl):
    x = case.make()
    fn = getattr(case, impl)

    def run():
        with torch.no_grad():
            fn(x)
        _sync()
    benchmark(run)


@pytest.mark.parametrize("impl", ["naive", "fused"])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[f"{c.op}-{c.shape.replace(' ', '')}" for c in BACKWARD_CASES])
def test_forward_backward(benchmark, case, impl):
    x = {k: (v.clone().requires_grad_() if k in case.grad_inputs else v) for k, v in case.make().items()}
    fn = getattr(case, impl)
    with torch.no_grad():
        grad = torch.rand_like(fn(x))

    def run():
        for v in x.values():
            v.grad = None
        fn(x).backward(grad)
        _sync()
    benchmark(run)
