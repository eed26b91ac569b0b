"""Hydra config groups, shipped inside the package as ``instruct.conf``."""
