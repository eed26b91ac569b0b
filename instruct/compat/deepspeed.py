"""DeepSpeed ZeRO (stages 1-2) and bf16 optimizers: the link from each parameter to its part of
the optimizer's fp32 master weights and moments.

``deepspeed.utils.safe_get_full_*`` / ``safe_set_full_*`` read and write a parameter's share
through that link (``param._hp_mapping``). DeepSpeed makes the moments' part of it lazily.
"""

from __future__ import annotations

from typing import Any

from instruct.compat import Private, missing

REQUIRES = (
    Private(
        "deepspeed", "deepspeed.utils.mixed_precision_linkage", "link_hp_params", "_hp_mapping"
    ),
    Private(
        "deepspeed",
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state",
        "_hp_optimizer_states_linked",
    ),
    Private(
        "deepspeed",
        "deepspeed.runtime.bf16_optimizer",
        "BF16_Optimizer._lazy_init_hp_params_optimizer_state",
        "_hp_optimizer_states_linked",
    ),
)


def check() -> list[str]:
    """A message for each private name in :data:`REQUIRES` that is gone."""
    return missing(REQUIRES)


def has_master(param: Any) -> bool:
    """Whether DeepSpeed keeps ``param``'s fp32 master copy, partitioned, in its optimizer
    (every process's parameter carries the mark, even one holding none of it).

    Private: ``_hp_mapping`` is the mark DeepSpeed's ``link_hp_params`` sets. The public
    ``safe_get_full_fp32_param`` would tell too (None without it) but is a collective: every
    process would have to ask about every parameter.
    """
    return hasattr(param, "_hp_mapping")


def link_moments(zero: Any) -> None:
    """Point each parameter at its part of the optimizer's moments.

    DeepSpeed (0.19) links them once, right after the first group's first step, when the
    other groups have no moments yet: with several parameter groups (weight decay on the
    matrices, none on norms and biases) those others stay unlinked and ``exp_avg`` is "not
    found" for them. Linking again once every group has stepped fixes that.

    Private: the optimizer's ``_lazy_init_hp_params_optimizer_state`` and the flag that makes
    it run only once. The public ``deepspeed.utils.lazy_init_hp_params_optimizer_state`` needs
    each group's flat fp32 partition, which the ZeRO and bf16 optimizers keep under different
    (undocumented) names; their own method knows which.
    """
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
