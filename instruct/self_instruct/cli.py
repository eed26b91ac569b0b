"""``python -m instruct.self_instruct [overrides]``: generate (or resume) a data set and print
where its tasks are."""

from __future__ import annotations

from omegaconf import DictConfig

from instruct.entry import hydra_main
from instruct.self_instruct.dataset import TASKS_FILE
from instruct.self_instruct.generate import ensure_dataset


@hydra_main("self_instruct")
def main(cfg: DictConfig) -> None:
    folder = ensure_dataset(cfg.data)
    print(f"data set: {folder / TASKS_FILE}")
