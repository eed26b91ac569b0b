"""The private APIs instruct cannot avoid, one adapter module per library.

Each adapter (``accelerate``, ``transformers``, ``deepspeed``, ``torch``, ``hydra``,
``wandb``, ``peft``) wraps the private names it uses in small functions, says why no public
API serves, and lists them in its ``REQUIRES``. ``tests/compat/`` resolves every one, so a
release that drops or renames one fails there, naming the library, its version and the name,
rather than in the middle of a run. The versions these were tested with are pinned in
``constraints.txt``; :func:`installed_versions` records the ones a run used.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# What results.json records under "versions": the project's main dependencies, then itself.
# DeepSpeed only when installed (it is optional).
VERSIONED = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "datasets",
    "hydra-core",
    "omegaconf",
    "wandb",
    "openai",
    "deepspeed",
    "instruct",
)


def installed_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str]:
    """The installed version of each distribution in ``names``; those not installed are left
    out."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class Private:
    """One private name an adapter relies on.

    ``attribute`` (dotted) is looked up on module ``module`` of distribution
    ``distribution``. Where the name is an instance attribute that no class carries, ``reads``
    names it and ``attribute`` is the function whose source must still mention it.
    """

    distribution: str
    module: str
    attribute: str
    reads: str | None = None

    @property
    def name(self) -> str:
        full = f"{self.module}.{self.attribute}"
        return f"{full} (its {self.reads})" if self.reads else full

    def resolve(self) -> Any:
        """The object named; raises ImportError or AttributeError when it is gone."""
        obj: Any = importlib.import_module(self.module)
        for part in self.attribute.split("."):
            obj = getattr(obj, part)
        if self.reads is not None and self.reads not in inspect.getsource(obj):
            raise AttributeError(f"its source no longer mentions {self.reads}")
        return obj


def missing(requirements: tuple[Private, ...]) -> list[str]:
    """A message for each of ``requirements`` that cannot be resolved, naming the library,
    its installed version and the private name; empty when all are there."""
    messages = []
    for req in requirements:
        try:
            req.resolve()
        except (ImportError, AttributeError, OSError, TypeError) as err:
            try:
                installed = version(req.distribution)
            except PackageNotFoundError:
                installed = "not installed"
            messages.append(
                f"{req.distribution} {installed}: private {req.name} is gone ({err}); "
                f"instruct.compat.{req.distribution.split('-')[0]} needs another way"
            )
    return messages
