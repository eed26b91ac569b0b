"""What the fused LoRA layer relies on in peft is still there, or the failure says what went."""

from __future__ import annotations

import pytest
import torch

from instruct.compat import peft as peft_compat


def test_peft_still_has_what_the_fused_lora_layer_relies_on():
    peft_compat.check()


def test_a_missing_name_fails_the_check_by_name():
    needs = (*peft_compat.LORA_LINEAR_NEEDS, "lora_gone")
    with pytest.raises(RuntimeError, match="lacks what instruct.kernels.fused_lora relies on: "
                       "lora_gone; run with lora.fused=false"):  # fmt: skip
        peft_compat.check(needs)


def test_only_a_subclass_of_a_module_s_own_class_replaces_it():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="Tanh is not a subclass of Linear"):
        peft_compat.become(layer, torch.nn.Tanh)

    class Traced(torch.nn.Linear):
        pass

    peft_compat.become(layer, Traced)
    assert type(layer) is Traced
