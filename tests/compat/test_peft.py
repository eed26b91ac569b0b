"""What the fused LoRA layer relies on in peft is still there, or the failure says what went."""

from __future__ import annotations

import peft
import pytest
import torch

from instruct.compat import peft as peft_compat


def test_peft_still_has_what_the_fused_lora_layer_relies_on():
    assert peft_compat.REQUIRES
    problems = peft_compat.check()
    assert not problems, "\n".join(problems)


def test_a_missing_name_is_named_with_peft_s_version():
    (message,) = peft_compat.check((*peft_compat.REQUIRES, "lora_gone"))
    assert message.startswith(f"peft {peft.__version__}: ")
    assert "lora_gone" in message and "instruct.compat.peft" in message


def test_only_a_subclass_of_a_module_s_own_class_replaces_it():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="Tanh is not a subclass of Linear"):
        peft_compat.become(layer, torch.nn.Tanh)
    assert type(layer) is torch.nn.Linear

    class Traced(torch.nn.Linear):
        pass

    peft_compat.become(layer, Traced)
    assert type(layer) is Traced
