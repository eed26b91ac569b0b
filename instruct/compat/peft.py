"""peft: our fused LoRA layer takes the place of peft's LoRA ``Linear`` by a class swap.

Why no public API serves: peft picks the class of each LoRA layer itself, from the type of
the module it wraps. The only way to hand it another class is
``LoraConfig._register_custom_module``: private, "experimental", meant for layer types peft
does not support (``nn.Linear`` it does), and it would build our layers instead of peft's.
So the layers peft built get a subclass of their own class in place (``module.__class__ =
...``): the subclass adds no weights and overrides only ``forward``, so state-dict names,
merging, ``disable_adapter`` and ``save_pretrained`` stay peft's. The subclass and the choice
of layers read the attributes in :data:`REQUIRES`; :func:`check` names any a peft release
dropped (``tests/compat/test_peft.py`` runs it).
"""

from __future__ import annotations

import torch

# What instruct.kernels.fused_lora reads on peft's LoRA Linear layers (checked on peft 0.21).
REQUIRES = (
    "active_adapters",  # the adapter names in use: fused only when exactly one
    "disable_adapters",  # adapters switched off: peft's forward
    "merged",  # adapters merged into the base weight: peft's forward
    "get_base_layer",  # the wrapped nn.Linear
    "fan_in_fan_out",  # a transposed base weight (GPT-2's Conv1D): not fused
    "lora_A",  # ModuleDict of nn.Linear, rank x in
    "lora_B",  # ModuleDict of nn.Linear, out x rank
    "lora_dropout",  # ModuleDict of nn.Dropout or nn.Identity
    "lora_variant",  # DoRA and other variants by adapter name: peft's forward
    "scaling",  # alpha / rank by adapter name
    "forward",  # peft's own, for every call the fused layer does not take
)


def lora_linear_class() -> type:
    """peft's LoRA layer around an ``nn.Linear`` (``peft.tuners.lora.layer.Linear``)."""
    from peft.tuners.lora.layer import Linear

    return Linear


def become(module: torch.nn.Module, cls: type) -> None:
    """Make ``module`` an instance of ``cls``, a subclass of its class that adds no state."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls


def check(needs: tuple[str, ...] = REQUIRES) -> list[str]:
    """A message for each of ``needs`` (by default everything the swap and the fused layer
    rely on) that peft's LoRA Linear layers no longer have; empty when all are there."""
    import peft
    from peft import LoraConfig, get_peft_model

    where, fix = f"peft {peft.__version__}", "instruct.compat.peft needs another way"
    try:
        cls = lora_linear_class()
    except (ImportError, AttributeError) as err:
        return [f"{where}: peft.tuners.lora.layer.Linear is gone ({err}); {fix}"]
    with torch.random.fork_rng(devices=[]):  # peft draws LoRA A's initial weights
        model = get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"])
        )
    layer = model.base_model.model[0]
    problems = []
    if type(layer) is not cls:
        problems.append(f"{where}: LoRA wraps nn.Linear in {type(layer).__qualname__}; {fix}")
    problems += [
        f"{where}: peft.tuners.lora.layer.Linear has no {name} any more; {fix}"
        for name in needs
        if not hasattr(layer, name)
    ]
    return problems
