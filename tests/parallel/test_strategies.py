"""The strategy registry, and the plain path's full state on one process."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from instruct.parallel import STRATEGIES, strategy_for
from instruct.parallel.base import Strategy
from instruct.parallel.ddp import DataParallel
from instruct.parallel.deepspeed import DeepSpeed
from instruct.parallel.fsdp import Fsdp, WholeForward
from instruct.parallel.single import Single

REPO = Path(__file__).resolve().parents[2]


def accelerator(kind: str) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("NO", Single), ("MULTI_CPU", DataParallel), ("MULTI_GPU", DataParallel),
     ("FSDP", Fsdp), ("DEEPSPEED", DeepSpeed), ("MULTI_XPU", DataParallel)],
)  # fmt: skip
def test_one_strategy_per_distributed_type(kind, expected):
    strategy = strategy_for(accelerator(kind))
    assert type(strategy) is expected
    assert strategy.name == kind  # as results.json records it


def test_accelerates_enum_picks_the_strategy_by_its_name():
    from accelerate.utils import DistributedType

    assert {kind.name for kind in DistributedType} >= set(STRATEGIES)
    assert type(strategy_for(SimpleNamespace(distributed_type=DistributedType.FSDP))) is Fsdp


def test_what_each_backend_needs_of_every_process():
    collective = {kind: cls.collective for kind, cls in STRATEGIES.items()}
    lockstep = {kind: cls.lockstep for kind, cls in STRATEGIES.items()}
    assert collective == {"NO": False, "MULTI_CPU": False, "MULTI_GPU": False,
                          "FSDP": True, "DEEPSPEED": True}  # fmt: skip
    assert [kind for kind, every in lockstep.items() if every] == ["FSDP"]


def test_fsdp_scores_through_the_roots_own_forward():
    model = torch.nn.Linear(2, 2)
    scorer = Fsdp(accelerator("FSDP")).scorer(model)
    assert isinstance(scorer, WholeForward) and scorer.module is model
    x = torch.ones(1, 2)
    assert torch.equal(scorer(x), model(x))


def test_the_plain_full_state_is_the_models_own_and_loads_back():
    strategy = Single(accelerator("NO"))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert strategy.model_weights(model, True) is None  # save_pretrained's own state dict
    trained = strategy.trained_weights(model, True)
    assert set(trained) == {"0.bias", "1.weight", "1.bias"}
    assert strategy.trained_weights(model, False) == {}  # not the writer: nothing kept
    saved = strategy.optimizer_state(model, optimizer, True)
    other = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    other[0].weight.requires_grad_(False)
    again = torch.optim.AdamW(other.parameters(), lr=0.1)
    params = strategy.trained_parameters(other)
    strategy.load_weights(other, params, trained)
    strategy.load_optimizer(other, again, saved, params, trained, "here")
    for name, p in params.items():
        assert torch.equal(p, trained[name])
    assert again.state_dict()["state"].keys() == saved["state"].keys()


def test_the_plain_step_clips_and_reports_the_norm_before_clipping():
    from accelerate import Accelerator

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    strategy = Strategy(Accelerator(cpu=True))
    strategy.backward(model, (model(torch.tensor([[3.0, 4.0]])) * 1.0).sum(), True)
    norm = strategy.optimizer_step(model, optimizer, 1.0)
    assert math.isclose(norm, 5.0)
    assert torch.allclose(model.weight, torch.tensor([[1 - 0.6, 1 - 0.8]]))
    assert model.weight.grad is None  # zeroed (set to None) after the step


def test_the_loop_never_asks_which_backend_it_is_on():
    """instruct/train.py names no backend outside comments: the strategy does."""
    source = (REPO / "instruct" / "train.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    named = sorted(n for n in names if "fsdp" in n.lower() or "deepspeed" in n.lower())
    assert not named, f"train.py branches on a backend: {named}"
