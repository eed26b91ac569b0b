"""Export merges LoRA into a plain Hugging Face folder that generates as the checkpoint did,
or writes the adapter alone in peft's layout (merge=false) that plain peft loads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from instruct.checkpoint import load_checkpoint
from instruct.config import compose
from instruct.data.templates import stop_tokens
from instruct.errors import ConfigError
from instruct.export import BASE_FOLDER, export, save_adapter
from instruct.model import build_model, fit_tokenizer
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


def until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """``ids`` up to and with the first stop id, where ``model.generate`` would stop."""
    cut = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return ids[:cut]


@pytest.mark.slow
def test_export_merges_lora_and_generates_the_same(lora_toy, tmp_path):
    run_dir, _ = lora_toy
    best = run_dir / "checkpoints" / "best"
    out = export(best, tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert "adapter_config.json" not in names

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    merged_tok = AutoTokenizer.from_pretrained(out)
    model, tokenizer, cfg = load_checkpoint(best)
    model.eval()
    assert merged_tok.chat_template == tokenizer.chat_template
    # The merged folder stops at the template's end of turn, as training's generation config
    # did; the rebuilt LoRA checkpoint's base config stops at EOS only, so it is cut there.
    stop_ids, _ = stop_tokens(cfg.template, tokenizer)
    assert merged.generation_config.eos_token_id == stop_ids
    for prompt in PROMPTS:
        want = until_stop(greedy_ids(model, tokenizer, prompt), stop_ids)
        assert greedy_ids(merged, merged_tok, prompt) == want
    ids = torch.tensor([merged_tok("Hello there, friend.").input_ids])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.slow
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


@pytest.mark.slow
def test_export_adapter_loads_with_plain_peft(lora_toy, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    run_dir, _ = lora_toy
    best = run_dir / "checkpoints" / "best"
    out = export(best, tmp_path / "adapter", merge=False)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert {"generation_config.json", BASE_FOLDER} <= names
    assert "model.safetensors" not in names
    config = json.loads((out / "adapter_config.json").read_text())
    # The tiny base exists only in memory in training: it is written beside the adapter.
    assert config["base_model_name_or_path"] == str(out / BASE_FOLDER)
    assert config["trainable_token_indices"] is None

    model, tokenizer, cfg = load_checkpoint(best)
    model.eval()
    merged = AutoModelForCausalLM.from_pretrained(export(best, tmp_path / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    adapted = PeftModel.from_pretrained(base, out).eval()  # what a peft user writes
    alone = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # base found from the config
    saved_tok = AutoTokenizer.from_pretrained(out)
    assert saved_tok.chat_template == tokenizer.chat_template
    ids = torch.tensor([saved_tok("Hello there, friend.").input_ids])
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(adapted(ids).logits, want)
        assert torch.equal(alone(ids).logits, want)
        assert torch.allclose(merged(ids).logits, want, atol=1e-4)
    # Both folders stop at the template's end of turn, as training's generation config did.
    stop_ids, _ = stop_tokens(cfg.template, tokenizer)
    assert adapted.generation_config.eos_token_id == stop_ids
    assert merged.generation_config.eos_token_id == stop_ids
    for prompt in PROMPTS:
        want = until_stop(greedy_ids(model, tokenizer, prompt), stop_ids)
        assert greedy_ids(adapted, saved_tok, prompt) == want


def test_export_adapter_points_at_the_folder_the_base_came_from(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    cfg = compose(["model=tiny", "template=chatml"])
    model, tokenizer = build_model(cfg.model)
    fit_tokenizer(model, tokenizer, cfg.template)
    model.save_pretrained(tmp_path / "base-model")
    monkeypatch.chdir(tmp_path)  # loaded by a relative path, as model.path=./base-model does
    base = AutoModelForCausalLM.from_pretrained("./base-model")
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    save_adapter(adapted, tokenizer, tmp_path / "out", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base-model").resolve())
    assert not (tmp_path / "out" / BASE_FOLDER).exists()


def test_export_adapter_refuses_a_fully_tuned_checkpoint(tuned_toy, tmp_path):
    run_dir, _ = tuned_toy
    with pytest.raises(ConfigError, match="merge=false: .* fully fine-tuned"):
        export(run_dir / "checkpoints" / "best", tmp_path / "adapter", merge=False)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_export_adapter_cli(lora_toy, tuned_toy, tmp_path):
    best = lora_toy[0] / "checkpoints" / "best"
    proc = run_module(
        "instruct.export", f"checkpoint={best}", "out=adapter", "merge=false", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LoRA adapter" in proc.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    full = tuned_toy[0] / "checkpoints" / "best"
    proc = run_module("instruct.export", f"checkpoint={full}", "out=x", "merge=false", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: merge=false: ")
