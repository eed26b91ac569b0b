"""The one way a command-line entry point meets Hydra.

``@hydra_main("generate")`` on an entry point's ``main(cfg)`` is ``@hydra.main`` with the
shipped configs (``pkg://instruct.conf``), this project's Hydra version base and every
schema registered before the config is composed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import hydra

from instruct.config import CONFIG_MODULE, HYDRA_VERSION_BASE, register_schemas


def hydra_main(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """Decorate ``main(cfg)`` into a command reading ``conf/<config_name>.yaml`` and the
    command line.

    ``hydra.main`` is applied to ``main`` itself (seen through ``functools.wraps``), so Hydra
    names the job after the module that defines it, as it always did.
    """

    def decorate(task: Callable[[Any], Any]) -> Callable[..., Any]:
        composed = hydra.main(
            config_path=f"pkg://{CONFIG_MODULE}",
            config_name=config_name,
            version_base=HYDRA_VERSION_BASE,
        )(task)

        @functools.wraps(task)
        def main(*args: Any, **kwargs: Any) -> Any:
            register_schemas()
            return composed(*args, **kwargs)

        return main

    return decorate
