"""instruct: config-driven instruction tuning with the loss on responses only."""

from instruct.quiet import quiet_deepspeed

__version__ = "0.1.0"

quiet_deepspeed()  # before anything imports DeepSpeed (see instruct.quiet)
