"""Sample replies: at each validation, greedy replies to a few validation prompts, logged as
a table beside the references (W&B and ``samples.jsonl``), so a run shows what it learns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig

from instruct.data import Example, prompt_and_reference
from instruct.data.templates import Message, to_messages
from instruct.decoding import generate, merged_adapter
from instruct.engine import Engine
from instruct.tracking import Tracker

COLUMNS = ["step", "prompt", "reference", "response"]


@dataclass
class Samples:
    """The sample prompts (conversations ending with a user turn) and their references."""

    prompts: list[list[Message]]
    references: list[str]
    template: Any
    max_new_tokens: int
    tracker: Tracker

    @classmethod
    def of(cls, examples: Sequence[Example], cfg: DictConfig, tracker: Tracker) -> Samples:
        """The first ``trainer.samples`` of ``examples``: each without its last reply, and
        that reply."""
        pairs = [prompt_and_reference(e) for e in examples[: cfg.trainer.samples]]
        prompts = [to_messages(example, cfg.template) for example, _ in pairs]
        references = [reference for _, reference in pairs]
        t = cfg.trainer
        return cls(prompts, references, cfg.template, t.sample_max_new_tokens, tracker)

    def log(self, step: int, engine: Engine) -> None:
        """The model's greedy replies now (LoRA merged while they are generated), as the
        table's rows of ``step``.

        In lockstep every process generates them, in step (see :meth:`Strategy.generating`);
        else the main process alone.
        """
        if not self.prompts or not (engine.main or engine.strategy.lockstep):
            return
        greedy = SimpleNamespace(
            max_new_tokens=self.max_new_tokens, do_sample=False, repetition_penalty=1.0
        )
        model = engine.unwrapped()
        # LoRA merged for the replies and restored bit for bit after (merged_adapter): each
        # decoding step then computes one product per layer, not three, and training goes on
        # from the very same weights.
        with engine.accelerator.autocast(), engine.strategy.generating(model), \
                merged_adapter(model) as merged:  # fmt: skip
            replies = generate(merged, engine.tokenizer, self.template, self.prompts, greedy,
                               desc="samples")  # fmt: skip
        rows = [
            [step, prompt[-1]["content"], reference, reply]
            for prompt, reference, reply in zip(self.prompts, self.references, replies, strict=True)
        ]
        self.tracker.table("samples", COLUMNS, rows, step)
