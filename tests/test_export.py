"""Export merges LoRA into a plain Hugging Face folder that generates as the checkpoint did."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instruct.checkpoint import load_checkpoint
from instruct.export import export
from tests.conftest import run_module

PROMPTS = ["Greet Ada.", "Say goodbye to Bob.", "Tell me about the weather."]


def greedy_ids(model, tokenizer, prompt: str) -> list[int]:
    """Generation the way a user of the exported folder does it: transformers only."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_export_merges_lora_and_generates_the_same(lora_toy, tmp_path):
    run_dir, _ = lora_toy
    best = run_dir / "checkpoints" / "best"
    out = export(best, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert "adapter_config.json" not in names

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    merged_tok = AutoTokenizer.from_pretrained(out)
    model, tokenizer, _ = load_checkpoint(best)
    model.eval()
    assert merged_tok.chat_template == tokenizer.chat_template
    for prompt in PROMPTS:
        assert greedy_ids(merged, merged_tok, prompt) == greedy_ids(model, tokenizer, prompt)
    ids = torch.tensor([merged_tok("Hello there, friend.").input_ids])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-4)


def test_export_never_overwrites(lora_toy, tmp_path):
    run_dir, _ = lora_toy
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(run_dir / "checkpoints" / "best", taken)
    assert (taken / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_export_cli(tuned_toy, tmp_path):
    run_dir, _ = tuned_toy
    proc = run_module(
        "instruct.export",
        f"checkpoint={run_dir / 'checkpoints' / 'best'}",
        f"out={tmp_path / 'hf'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    reply = tokenizer.decode(greedy_ids(model, tokenizer, "Greet Ada."), skip_special_tokens=True)
    assert reply == "Hello! It is good to see you."
