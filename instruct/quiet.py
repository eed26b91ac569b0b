"""Library notices a user cannot act on, kept off the screen; nothing else is silenced.

- DeepSpeed, when installed, logs "Setting accelerator to CPU. If you have GPU or other
  accelerator, we were unable to detect it." as it is imported on any machine without CUDA,
  whether or not the run uses DeepSpeed. A filter on its logger (which it creates by that
  name, keeping filters already there) drops that one message.
- peft reads ``model.is_gradient_checkpointing`` in ``get_peft_model``, which transformers 5
  deprecates with a FutureWarning: :func:`peft_notices` hides it around that call.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

DEEPSPEED_LOGGER = "DeepSpeed"
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"


def not_deepspeed_cpu_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(DEEPSPEED_CPU_NOTICE)


def quiet_deepspeed() -> None:
    """Drop DeepSpeed's CPU notice, before DeepSpeed is imported (idempotent)."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not_deepspeed_cpu_notice not in logger.filters:
        logger.addFilter(not_deepspeed_cpu_notice)


@contextmanager
def peft_notices() -> Iterator[None]:
    """Inside: transformers' deprecation of ``is_gradient_checkpointing``, read by peft."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning
        )
        yield
