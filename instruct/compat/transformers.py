"""transformers' mark of an FSDP-managed module, which makes ``generate`` decode in step.

Under FSDP every forward pass gathers weights with collectives, so every process must run as
many as the others. ``generate`` keeps finished processes stepping (``synced_gpus``) when it
sees a module managed by FSDP: ``transformers.distributed.fsdp.is_fsdp_managed_module``
reads the ``_is_fsdp_managed_module`` attribute that transformers' own ``apply_fsdp2`` sets.
A model sharded by Accelerate carries no such mark, so it is set by hand.
"""

from __future__ import annotations

from typing import Any

from instruct.compat import Private, missing

REQUIRES = (
    Private(
        "transformers",
        "transformers.generation.utils",
        "is_fsdp_managed_module",
        "_is_fsdp_managed_module",
    ),
)


def check() -> list[str]:
    """A message for each private name in :data:`REQUIRES` that is gone."""
    return missing(REQUIRES)


def mark_fsdp_managed(module: Any) -> None:
    """Make ``module.generate`` run with ``synced_gpus`` on two or more processes.

    Private: the public ``generate(synced_gpus=True)`` would have to be passed by every
    caller of ``instruct.decoding.generate`` (training samples, evaluation) while the model is
    sharded; the mark, which stays on the module, is what transformers itself checks.
    """
    module._is_fsdp_managed_module = True
