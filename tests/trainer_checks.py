"""Shared checks of the training-loop tests: a trainer's weights, and bit-equality of two sets
(pytest's default import mode puts the tests folder on sys.path)."""
import torch


def weights(trainer) -> dict:
    return {f"{n}.{k}": v.clone() for n, m in trainer.nets.items() for k, v in m.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
