"""instruct: config-driven instruction tuning with the loss on responses only."""

__version__ = "0.1.0"
