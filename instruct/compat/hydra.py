"""Hydra's command line, read before Hydra starts (to continue an interrupted sweep)."""

from __future__ import annotations

import argparse

from instruct.compat import Private, missing

REQUIRES = (Private("hydra-core", "hydra._internal.utils", "get_args_parser"),)


def check() -> list[str]:
    """A message for each private name in :data:`REQUIRES` that is gone."""
    return missing(REQUIRES)


def args_parser() -> argparse.ArgumentParser:
    """The parser ``@hydra.main`` reads ``sys.argv`` with (``-m``, ``--config-name``, the
    overrides, ...).

    Private: ``hydra._internal.utils.get_args_parser``. Hydra has no public way to parse its
    command line without running the app, and a copy of its flags would drift from it.
    """
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


def sweeper_target(name: str) -> str:
    """The ``_target_`` (the class) of Hydra's sweeper config ``hydra/sweeper=<name>``, as a
    sweep's ``multirun.yaml`` records it: for ``basic``,
    ``hydra._internal.core_plugins.basic_sweeper.BasicSweeper``.

    Public: read from Hydra's ConfigStore, where the sweeper's plugin module registers its
    config once Hydra's plugins are loaded (as Hydra itself loads them), so the private module
    path is never written here.
    """
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the plugin modules, which register their configs
    return str(ConfigStore.instance().load(f"hydra/sweeper/{name}.yaml").node._target_)
