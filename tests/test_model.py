"""Model building: the tiny model, LoRA, and tokens a template has to add."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from instruct.config import compose
from instruct.data.batching import collate
from instruct.data.templates import render, to_messages
from instruct.data.tokenize import prepare
from instruct.loss import loss_sum
from instruct.model import (
    apply_lora,
    base_model_of,
    build_model,
    build_tiny_tokenizer,
    count_parameters,
    fit_tokenizer,
)


def small_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def test_tiny_model_is_deterministic_and_uses_its_tokenizer():
    cfg = compose(["model=tiny"]).model
    (a, tok), (b, _) = build_model(cfg), build_model(cfg)
    assert a.get_input_embeddings().num_embeddings == len(tok)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    assert tok.is_fast and tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_base_model_of_is_the_builders_model_grown_to_a_checkpoint_s_tokenizer():
    """Training, load_checkpoint and the evaluation's base model all start here: the builder's
    model and tokenizer, or that model with embeddings for a tokenizer a template grew."""
    cfg = compose(["model=tiny"]).model
    (model, tok), (built, _) = base_model_of(cfg), build_model(cfg)
    pairs = zip(model.state_dict().values(), built.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    rows = model.get_input_embeddings().weight
    tok.add_tokens(["<|new|>"], special_tokens=True)
    grown, same = base_model_of(cfg, tok)
    assert same is tok and grown.get_input_embeddings().num_embeddings == len(tok) == len(rows) + 1
    assert torch.equal(grown.get_input_embeddings().weight[: len(rows)], rows)


@pytest.mark.slow
def test_lora_targets_every_linear_layer_and_none_trains_everything():
    model, _ = build_model(compose(["model=tiny"]).model)
    lora = apply_lora(model, compose(["lora.rank=4"]).lora, [])
    names = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1]
        for n, _ in lora.named_parameters()
        if "lora_A" in n
    }
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable, total = count_parameters(lora)
    assert 0 < trainable < total / 5
    full, _ = build_model(compose(["model=tiny"]).model)
    full = apply_lora(full, compose(["lora=none"]).lora, [])
    assert count_parameters(full)[0] == count_parameters(full)[1]


@pytest.mark.slow
def test_tokens_a_template_adds_are_trained_and_saved_with_the_adapter(tmp_path):
    """A base tokenizer without <|im_start|>/<|im_end|>: ChatML must add and train them."""
    cfg = compose(["template=chatml", "lora.rank=4"])
    tok = build_tiny_tokenizer(4096, ["<|endoftext|>"])
    model = small_llama(len(tok))
    new_ids = fit_tokenizer(model, tok, cfg.template)
    assert tok.convert_ids_to_tokens(new_ids) == ["<|im_start|>", "<|im_end|>"]
    assert model.get_input_embeddings().num_embeddings == len(tok)
    peft_model = apply_lora(model, cfg.lora, new_ids)
    messages = to_messages({"instruction": "hi", "output": "yo"}, cfg.template)
    features, _ = prepare([render(messages, cfg.template, tok)], tok, 64)
    assert features[0].labels[-1] == new_ids[1]  # <|im_end|> is a trained label
    batch = collate(features, tok.pad_token_id)
    before = peft_model.get_input_embeddings()(torch.arange(len(tok))).detach().clone()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    loss, _ = loss_sum(peft_model, batch)
    loss.backward()
    optimizer.step()
    after = peft_model.get_input_embeddings()(torch.arange(len(tok))).detach()
    changed = (after - before).abs().sum(dim=1) > 0
    assert changed[new_ids].all() and not changed[: new_ids[0]].any()

    peft_model.save_pretrained(tmp_path)
    base = small_llama(len(tok) - 2)
    base.resize_token_embeddings(len(tok))
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    peft_model.eval()  # no LoRA dropout
    with torch.no_grad():
        expect = peft_model(input_ids=batch["input_ids"]).logits
        got = reloaded(input_ids=batch["input_ids"]).logits
    assert torch.allclose(expect[..., : new_ids[0]], got[..., : new_ids[0]], atol=1e-5)
    assert torch.allclose(
        reloaded.get_input_embeddings()(torch.tensor(new_ids)), after[new_ids], atol=1e-6
    )
