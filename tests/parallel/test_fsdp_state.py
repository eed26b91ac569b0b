"""FSDP's full state (``torch.distributed.checkpoint.state_dict``) is one process's.

Two processes on the CPU (gloo) shard a tiny tied-embedding Llama with ``fully_shard`` and take
one AdamW step; one unsharded copy takes the same step. The strategy's saves (the weights
``save_pretrained`` writes, the trained weights, the optimizer state keyed by index) equal
the copy's own, and loading them into a freshly sharded model and optimizer gives the same
next step as the copy's. Full fine-tuning (DCP's path) and LoRA (frozen weights: ours).
"""

from __future__ import annotations

import copy
import os
import socket
from types import SimpleNamespace

import pytest
import torch

from tests.parallel.test_distributed import fsdp_unavailable


def tiny(lora: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # not zero, so the adapters' step shows
                torch.nn.init.normal_(p)
    return model


def sharded(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_decoder().layers:
        fully_shard(layer)
    return fully_shard(model)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    trained = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def assert_same(mine: dict, theirs: dict) -> None:
    assert list(mine) == list(theirs)
    for key, value in mine.items():
        if isinstance(value, dict):
            assert_same(value, theirs[key])
        elif torch.is_tensor(value):
            assert not hasattr(value, "device_mesh"), key  # whole, not a DTensor
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6)
        else:
            assert value == theirs[key], (key, value, theirs[key])


def check(rank: int, port: int, lora: bool) -> None:
    import torch.distributed as dist

    from instruct.parallel.fsdp import Fsdp
    from instruct.parallel.full_state import whole_weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        strategy, keep = Fsdp(SimpleNamespace(distributed_type="FSDP")), rank == 0
        one = tiny(lora)
        model = sharded(copy.deepcopy(one))
        one_opt, optimizer = adamw(one), adamw(model)
        assert strategy.optimizer_state(model, optimizer, keep) == (
            one_opt.state_dict() if keep else {}
        )  # before any step: nothing to gather
        step(one, one_opt, 1)
        step(model, optimizer, 1)  # the same batch on both processes: the same mean gradient

        weights = strategy.model_weights(model, keep)
        trained = strategy.trained_weights(model, keep)
        state = strategy.optimizer_state(model, optimizer, keep)
        if keep:
            assert_same(weights, whole_weights(one, True))
            if not lora:  # tied: one tensor, which save_pretrained writes once
                assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
            expected = {n: p.detach() for n, p in one.named_parameters() if p.requires_grad}
            assert_same(trained, expected)
            assert_same(state, one_opt.state_dict())
        else:
            assert weights == trained == state == {}

        # A resume: every process reads the whole tensors, into a freshly sharded model.
        trained, state = rank0_to_all((trained, state))
        again = sharded(tiny(lora))
        again_opt = adamw(again)
        params = strategy.trained_parameters(again)
        strategy.load_weights(again, params, trained)
        strategy.load_optimizer(again, again_opt, state, params, trained, "here")
        step(one, one_opt, 2)
        step(again, again_opt, 2)
        after = strategy.trained_weights(again, keep)
        if keep:
            expected = {n: p.detach() for n, p in one.named_parameters() if p.requires_grad}
            assert_same(after, expected)
            assert_same(strategy.optimizer_state(again, again_opt, keep), one_opt.state_dict())
        else:
            strategy.optimizer_state(again, again_opt, keep)
    finally:
        dist.destroy_process_group()


def rank0_to_all(value: object) -> object:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(fsdp_unavailable() is not None, reason=str(fsdp_unavailable()))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_full_state_is_one_processs_and_resumes_to_its_next_step(lora):
    import torch.multiprocessing as mp

    mp.spawn(check, args=(free_port(), lora), nprocs=2, join=True)
