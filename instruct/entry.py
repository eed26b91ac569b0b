"""The one way a command-line entry point meets Hydra.

``@hydra_main("generate")`` on an entry point's ``main(cfg)`` is ``@hydra.main`` with the
shipped configs (``pkg://instruct.conf``), this project's Hydra version base and every
schema registered before the config is composed, and user errors told as one line
(:mod:`instruct.errors`): a :class:`~instruct.errors.UserError` raised by a single run, or a
config Hydra cannot compose, exits with status 2. In a sweep (``-m``) a job's user error
fails that job as Hydra fails it, and the sweep goes on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from instruct.config import CONFIG_MODULE, HYDRA_VERSION_BASE, register_schemas
from instruct.errors import USAGE_EXIT, full_errors, told_as_one_line


def hydra_main(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """Decorate ``main(cfg)`` into a command reading ``conf/<config_name>.yaml`` and the
    command line.

    ``hydra.main`` is applied to ``main`` itself (seen through ``functools.wraps``), so Hydra
    names the job after the module that defines it, as it always did.
    """

    def decorate(task: Callable[[Any], Any]) -> Callable[..., Any]:
        started = []

        @functools.wraps(task)  # Hydra unwraps it: the job is still named after task's module
        def guarded(cfg: Any) -> Any:
            started.append(True)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                return task(cfg)
            with told_as_one_line():
                return task(cfg)

        composed = hydra.main(
            config_path=f"pkg://{CONFIG_MODULE}",
            config_name=config_name,
            version_base=HYDRA_VERSION_BASE,
        )(guarded)

        @functools.wraps(task)
        def main(*args: Any, **kwargs: Any) -> Any:
            register_schemas()
            try:
                return composed(*args, **kwargs)
            except SystemExit as stop:
                # Hydra prints a config it cannot compose (an unknown key, a wrong type or
                # value, naming the key) without a traceback and exits with 1: a usage error.
                if stop.code == 1 and not started and not full_errors():
                    raise SystemExit(USAGE_EXIT) from None
                raise

        return main

    return decorate
