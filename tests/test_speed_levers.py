"""Each speed lever of the trainer gives the result of the plain path (packing, output layer at
supervised positions, tokenised cache, fused AdamW, bf16 with a frozen base in bf16)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from instruct.config import compose
from instruct.data import load_splits
from instruct.data.features import tokenize_split
from instruct.loss import loss_sum
from instruct.model import (
    PACKED_ATTENTION,
    apply_lora,
    build_model,
    cast_frozen,
    fit_tokenizer,
    use_packed_attention,
)
from instruct.tokenize import IGNORE_INDEX, Feature, collate, pack, prepare_cached
from instruct.train import packing_error, train
from tests.conftest import toy_config


def tiny(*overrides: str, packed: bool = True):
    cfg = compose(["model=tiny", "template=chatml", *overrides])
    model, tokenizer = build_model(cfg.model)
    new_ids = fit_tokenizer(model, tokenizer, cfg.template)
    if packed:
        assert use_packed_attention(model) == PACKED_ATTENTION
    model = apply_lora(model, cfg.lora, new_ids)
    train_examples, _ = load_splits(cfg.data, cfg.seed)
    features, _ = tokenize_split(train_examples[:8], cfg, tokenizer)
    return cfg, model, tokenizer, features


def test_pack_lays_examples_end_to_end():
    a = Feature([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Feature([8, 9], [8, 9])  # a label at position 0 is never a target
    row = pack([a, b])
    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The first token of b would be predicted from a's last token: never a target.
    assert row["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert row["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert row["max_length_q"] == 3


@pytest.mark.parametrize("lora", ["lora=none", "lora=default"])
def test_packed_row_gives_the_padded_loss_and_gradients(lora):
    _, model, tokenizer, features = tiny(lora, "lora.dropout=0")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(inputs):
        model.zero_grad()
        loss, n = loss_sum(model, inputs)
        loss.backward()
        return loss.detach(), n, [p.grad.clone() for p in params]

    padded = loss_and_grads(collate(features, tokenizer.pad_token_id))
    packed = loss_and_grads(pack(features))
    assert packed[1] == padded[1] == sum(f.supervised for f in features)
    assert torch.allclose(packed[0], padded[0], rtol=1e-5)
    for g_packed, g_padded in zip(packed[2], padded[2], strict=True):
        # Float noise of a different summation order, relative to the tensor's scale.
        assert (g_packed - g_padded).abs().max() <= 1e-5 * g_padded.abs().max()


def test_packing_check_catches_attention_across_examples(monkeypatch):
    """Without the example boundaries the second example sees the first: the check says so."""
    import instruct.train as train_module

    _, model, tokenizer, features = tiny()
    assert packing_error(model, features, tokenizer.pad_token_id, "cpu") < 1e-4

    def leaky(features, pad_id, packed):
        row = pack(features)
        n = row["input_ids"].shape[1]
        return {"input_ids": row["input_ids"], "position_ids": torch.arange(n)[None]}

    monkeypatch.setattr(train_module, "batch", leaky)
    assert packing_error(model, features, tokenizer.pad_token_id, "cpu") > 1e-2


def test_transformers_block_mask_also_packs_an_eager_model():
    """Models left on another attention get a block mask derived from the position ids."""
    cfg, model, tokenizer, features = tiny(packed=False)
    model.set_attn_implementation("eager")
    assert use_packed_attention(model) == "eager"
    assert packing_error(model, features, tokenizer.pad_token_id, "cpu") < 1e-4
    loss_padded, _ = loss_sum(model.eval(), collate(features, tokenizer.pad_token_id))
    loss_packed, _ = loss_sum(model, pack(features))
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-5)


def test_packed_and_padded_training_give_the_same_run(toy_data, tmp_path):
    common = ("logger=none", "trainer.max_steps=6", "trainer.save_best=false")
    padded = train(toy_config(toy_data, tmp_path / "a", "trainer.packing=false", *common))
    packed = train(toy_config(toy_data, tmp_path / "b", *common))
    assert packed["packing"] and not padded["packing"]
    for (_, x), (_, y) in zip(
        padded["train_loss_history"], packed["train_loss_history"], strict=True
    ):
        assert x == pytest.approx(y, rel=1e-4)
    assert packed["final_val_loss"] == pytest.approx(padded["final_val_loss"], rel=1e-4)
    assert packed["supervised_tokens"] == padded["supervised_tokens"]


def test_tokenised_cache_hits_on_the_same_work_and_misses_on_any_change(tmp_path, monkeypatch):
    import instruct.tokenize as tok_module
    from instruct.templates import render_many, to_messages

    cfg = compose(["model=tiny", "template=chatml"])
    _, tokenizer = build_model(cfg.model)
    examples, _ = load_splits(cfg.data, cfg.seed)
    rendered = render_many([to_messages(e, cfg.template) for e in examples], cfg.template,
                           tokenizer)  # fmt: skip
    first, stats = prepare_cached(rendered, tokenizer, 64, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and stats.truncated > 0

    calls = []
    real_prepare = tok_module.prepare
    monkeypatch.setattr(tok_module, "prepare", lambda *a: calls.append(a) or real_prepare(*a))
    again, stats_again = prepare_cached(rendered, tokenizer, 64, tmp_path)
    assert calls == [] and again == first and stats_again == stats

    prepare_cached(rendered, tokenizer, 128, tmp_path)  # another max_length
    prepare_cached(rendered[:-1], tokenizer, 64, tmp_path)  # other data
    tokenizer.add_tokens(["<|new|>"], special_tokens=True)  # another tokenizer
    prepare_cached(rendered, tokenizer, 64, tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.npz"))) == 4


def test_a_corrupt_cache_entry_is_rebuilt(tmp_path, caplog):
    cfg = compose(["model=tiny"])
    _, tokenizer = build_model(cfg.model)
    from instruct.templates import render_many, to_messages

    examples, _ = load_splits(cfg.data, cfg.seed)
    rendered = render_many([to_messages(e, cfg.template) for e in examples[:5]], cfg.template,
                           tokenizer)  # fmt: skip
    features, _ = prepare_cached(rendered, tokenizer, 256, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again, _ = prepare_cached(rendered, tokenizer, 256, tmp_path)
    assert again == features and "unreadable tokenised cache" in caplog.text


def test_fused_adamw_takes_the_same_steps_as_foreach(toy_data, tmp_path):
    common = ("logger=none", "trainer.max_steps=4", "trainer.save_best=false")
    fused = train(toy_config(toy_data, tmp_path / "a", "optimizer.fused=true", *common))
    plain = train(toy_config(toy_data, tmp_path / "b", "optimizer.fused=false", *common))
    for (_, x), (_, y) in zip(
        fused["train_loss_history"], plain["train_loss_history"], strict=True
    ):
        assert x == pytest.approx(y, rel=1e-5)


def test_fused_lora_layers_train_the_run_peft_layers_train(toy_data, tmp_path):
    common = ("logger=none", "trainer.max_steps=5", "trainer.save_best=false",
              "lora=default", "lora.dropout=0")  # fmt: skip
    fused = train(toy_config(toy_data, tmp_path / "a", "lora.fused=true", *common))
    plain = train(toy_config(toy_data, tmp_path / "b", "lora.fused=false", *common))
    assert fused["final_val_loss"] == pytest.approx(plain["final_val_loss"], rel=1e-5)
    for (_, x), (_, y) in zip(
        fused["train_loss_history"], plain["train_loss_history"], strict=True
    ):
        assert x == pytest.approx(y, rel=1e-5)


def test_a_run_with_dropout_positions_trains_as_one_with_the_same_masks(
    toy_data, tmp_path, monkeypatch
):
    """Whole runs, every adapted layer, packed rows: dropout drawn as positions gives the
    losses of dropout drawn as masks when both drop the same elements (here the positions
    are read off the very mask the other run draws, from the same seed)."""
    import instruct.model as model_module

    draw_mask, calls = model_module.keep_mask, []

    def positions_of_the_mask(n, p):
        calls.append(n)
        return (~draw_mask((n,), p, "cpu")).nonzero().squeeze(1)

    monkeypatch.setattr(model_module, "dropped_positions", positions_of_the_mask)
    common = ("logger=none", "trainer.max_steps=5", "trainer.save_best=false",
              "lora=default", "lora.dropout=0.1")  # fmt: skip
    masks = train(toy_config(toy_data, tmp_path / "a", "lora.dropout_draw=mask", *common))
    assert not calls
    positions = train(toy_config(toy_data, tmp_path / "b", "lora.dropout_draw=positions", *common))
    assert calls  # the second run drew positions
    assert positions["final_val_loss"] == pytest.approx(masks["final_val_loss"], rel=1e-5)
    for (_, x), (_, y) in zip(
        positions["train_loss_history"], masks["train_loss_history"], strict=True
    ):
        assert x == pytest.approx(y, rel=1e-5)


def test_bf16_keeps_a_frozen_base_in_bf16_and_the_rest_in_fp32():
    _, model, _, _ = tiny("lora=default")
    changed = cast_frozen(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert changed > 0
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "base_layer" in n)
    assert all(d == torch.float32 for n, d in dtypes.items() if "embed" in n or "norm" in n)


def test_bf16_run_tracks_the_fp32_run(toy_data, tmp_path):
    common = ("logger=none", "trainer.max_steps=6", "trainer.save_best=false",
              "lora=default", "lora.dropout=0")  # fmt: skip
    fp32 = train(toy_config(toy_data, tmp_path / "a", *common))
    bf16 = train(toy_config(toy_data, tmp_path / "b", "trainer.precision=bf16", *common))
    assert bf16["final_val_loss"] == pytest.approx(fp32["final_val_loss"], rel=2e-2)
    assert bf16["train_loss_history"] != fp32["train_loss_history"]  # bf16 really ran
    for (_, x), (_, y) in zip(fp32["train_loss_history"], bf16["train_loss_history"], strict=True):
        assert x == pytest.approx(y, rel=2e-2)


def test_loss_sum_with_full_logits_on_a_packed_row_matches():
    """The full-forward fallback (used under DDP) reads packed rows the same way."""
    _, model, tokenizer, features = tiny("lora=none")
    model.eval()
    row = pack(features)
    fast, n = loss_sum(model, row)
    logits = model(**{k: v for k, v in row.items() if k != "labels"}, use_cache=False).logits
    labels = row["labels"][:, 1:]
    full = F.cross_entropy(logits[0, :-1], labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
    assert n == int((labels != IGNORE_INDEX).sum())
    assert torch.allclose(fast, full, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_linear_cross_entropy_equals_the_plain_one(monkeypatch, bias, weight_trains):
    import instruct.loss as loss_module
    from instruct.loss import linear_cross_entropy

    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows a chunk, uneven end
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=weight_trains)
    b = torch.randn(50, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, 50, (10,), generator=g)
    inputs = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]

    plain = F.cross_entropy(F.linear(hidden, weight, b), targets, reduction="sum")
    plain_grads = torch.autograd.grad(3 * plain, inputs)
    chunked = linear_cross_entropy(hidden, weight, b, targets)
    chunked_grads = torch.autograd.grad(3 * chunked, inputs)
    assert torch.allclose(chunked, plain, rtol=1e-6)
    for x, y in zip(chunked_grads, plain_grads, strict=True):
        assert (x - y).abs().max() <= 1e-5 * y.abs().max()
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, b, targets), plain)


@pytest.mark.parametrize("lora", ["lora=none", "lora=default"])
def test_fused_loss_gives_the_loss_and_gradients_of_the_plain_head(lora):
    """Full fine-tuning trains the tied head/embedding through the fused loss too."""
    _, model, _, features = tiny(lora, "lora.dropout=0")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    row = pack(features)
    results = []
    for fused in (False, True):
        model.zero_grad()
        loss, n = loss_sum(model, row, fused)
        loss.backward()
        results.append((loss.detach(), n, [p.grad.clone() for p in params]))
    (plain, n_plain, g_plain), (fused, n_fused, g_fused) = results
    assert n_plain == n_fused and torch.allclose(fused, plain, rtol=1e-5)
    for x, y in zip(g_fused, g_plain, strict=True):
        assert (x - y).abs().max() <= 1e-5 * y.abs().max()


def test_fused_loss_under_bf16_autocast_tracks_fp32():
    _, model, _, features = tiny("lora=none")
    row = pack(features)
    with torch.no_grad():
        fp32, _ = loss_sum(model, row, fused=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain, _ = loss_sum(model, row, fused=False)
            fused, _ = loss_sum(model, row, fused=True)
    assert fused.dtype == torch.float32
    assert fused == pytest.approx(plain.item(), rel=1e-2)
    assert fused == pytest.approx(fp32.item(), rel=1e-2)


def test_keep_mask_keeps_with_probability_1_minus_p_and_follows_the_seed():
    from instruct.model import keep_mask

    torch.manual_seed(0)
    keep = keep_mask((1000, 1000), 0.1, "cpu")
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    # 1e6 draws: the keep rate is within 5 standard deviations (1.5e-3) of 0.9.
    assert abs(keep.float().mean().item() - 0.9) < 1.5e-3
    # and no share of the threads repeats another's numbers
    halves = keep.view(2, -1)
    assert not torch.equal(halves[0], halves[1])
    torch.manual_seed(0)
    assert torch.equal(keep_mask((1000, 1000), 0.1, "cpu"), keep)  # the seed fixes the mask
    assert not torch.equal(keep_mask((1000, 1000), 0.1, "cpu"), keep)  # each call draws anew


def test_dropped_positions_drop_each_element_with_probability_p_and_follow_the_seed():
    from instruct.model import dropped_positions

    n, p = 1_000_000, 0.1
    for batch in (None, 1000):  # enough at once, or drawn in many rounds
        torch.manual_seed(0)
        drop = dropped_positions(n, p, batch)
        assert drop.dtype == torch.int64
        assert int(drop[0]) >= 0 and int(drop[-1]) < n and bool((drop.diff() > 0).all())
        # 1e6 elements: the count is within 5 standard deviations (1,500) of 100,000
        assert abs(len(drop) - n * p) < 5 * (n * p * (1 - p)) ** 0.5
        # independent drops: the gaps between them are geometric with mean 1 / p and
        # P(gap = k) = (1 - p)**(k - 1) * p; an off-by-one or a bias in the gaps fails here
        gaps = drop.diff()
        assert abs(gaps.double().mean().item() - 1 / p) < 5 * ((1 - p) / p**2 / len(gaps)) ** 0.5
        for k in (1, 2, 10):
            share, want = (gaps == k).double().mean().item(), (1 - p) ** (k - 1) * p
            assert abs(share - want) < 5 * (want * (1 - want) / len(gaps)) ** 0.5, k
        torch.manual_seed(0)
        assert torch.equal(dropped_positions(n, p, batch), drop)  # the seed fixes the draw
        assert not torch.equal(dropped_positions(n, p, batch), drop)  # each call draws anew
    assert len(dropped_positions(0, 0.1)) == 0


def test_dropout_is_drawn_as_positions_on_the_cpu_at_low_rates_and_as_a_mask_otherwise():
    from instruct.model import POSITIONS_BELOW, draw_dropout

    shape = torch.Size((40, 50))
    kinds = {
        (how, p, device): draw_dropout(shape, p, device, how).dtype
        for how in ("auto", "positions", "mask")
        for p in (0.05, POSITIONS_BELOW)  # auto: positions below POSITIONS_BELOW only
        for device in ("cpu", "meta")  # meta: a device other than the CPU
    }
    low, high = 0.05, POSITIONS_BELOW
    positions = {("auto", low, "cpu"), ("positions", low, "cpu"), ("positions", high, "cpu")}
    assert {key for key, dtype in kinds.items() if dtype == torch.int64} == positions
    assert all(dtype == torch.bool for key, dtype in kinds.items() if key not in positions)
    with pytest.raises(ValueError, match="lora.dropout_draw must be auto, positions, mask"):
        draw_dropout(shape, 0.1, "cpu", "sparse")


class FixedMaskDropout(torch.nn.Module):
    """``nn.Dropout`` with a given mask, for comparing peft's layer with the fused one."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep / (1 - self.p) if self.training else x


def two_lora_mlps(p: float, bias: bool, draw: str = "auto"):
    """The same small MLP with LoRA twice: peft's layers and the fused ones."""
    from peft import LoraConfig, get_peft_model

    from instruct.model import fuse_lora

    models = []
    for _ in range(2):
        torch.manual_seed(1)
        mlp = torch.nn.Sequential(
            torch.nn.Linear(48, 40, bias=bias), torch.nn.Tanh(), torch.nn.Linear(40, 24)
        )
        config = LoraConfig(r=4, lora_alpha=12, lora_dropout=p, target_modules=["0", "2"])
        model = get_peft_model(mlp, config)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0, which would hide errors in A's path
                param.data.normal_()
        models.append(model)
    assert fuse_lora(models[1], draw) == 2
    return models


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("p, draw", [(0.0, "auto"), (0.25, "mask"), (0.25, "positions")])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_layer_gives_peft_output_and_gradients(monkeypatch, precision, p, draw, bias):
    """For the same dropout masks: the fused layers' output and the gradients of the input,
    the adapters and a trainable bias are peft's, in fp32 to float noise; in bf16 no further
    from the fp32 figures than peft's own bf16 ones (bf16 rounds in different places). The
    masks reach the fused layers as masks or as the positions of the dropped elements."""
    import instruct.model as model_module

    plain, fused = two_lora_mlps(p, bias, draw)
    for model in (plain, fused):
        for layer in model.base_model.model[::2]:
            if bias:
                layer.get_base_layer().bias.requires_grad_(True)  # a frozen bias's gradient too
    x = torch.randn(3, 10, 48)
    masks = [torch.rand(3, 10, 48) >= p, torch.rand(3, 10, 40) >= p]
    for layer, keep in zip(plain.base_model.model[::2], masks, strict=True):
        if p > 0:
            layer.lora_dropout["default"] = FixedMaskDropout(keep, p)

    def run(model, bf16):
        drawn, kinds = iter(masks), []

        def as_mask(shape, p, device):
            kinds.append("mask")
            return next(drawn)

        def as_positions(n, p):
            kinds.append("positions")
            keep = next(drawn)
            assert keep.numel() == n
            return (~keep).flatten().nonzero().squeeze(1)

        monkeypatch.setattr(model_module, "keep_mask", as_mask)
        monkeypatch.setattr(model_module, "dropped_positions", as_positions)
        model.train()
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(xi)
        (out.float() * torch.linspace(-1, 1, 24)).sum().backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}
        assert len(grads) == 4 + 2 * bias
        if model is fused and p > 0:
            assert kinds == [draw, draw]  # both layers drew as asked
        return {"out": out.float(), "x": xi.grad, **grads}

    reference, ours = run(plain, False), run(fused, precision == "bf16")
    assert type(fused.base_model.model[0]).__name__ == "FusedLoraLinear"
    assert sorted(ours) == sorted(reference)
    peft_bf16 = run(plain, True) if precision == "bf16" else None
    for name, want in reference.items():
        scale = want.abs().max()
        error = (ours[name] - want).abs().max()
        if peft_bf16 is None:
            assert error <= 1e-5 * scale, name
        else:
            assert error <= 2 * (peft_bf16[name] - want).abs().max() + 1e-3 * scale, name


def test_fused_lora_layer_falls_back_to_peft_where_it_does_not_apply():
    plain, fused = two_lora_mlps(0.1, bias=False)
    x = torch.randn(5, 48)
    for model in (plain, fused):
        model.eval()  # no dropout: both are deterministic
    with torch.no_grad():
        with_adapters = fused(x)
        assert torch.allclose(with_adapters, plain(x), atol=1e-5)
        with fused.disable_adapter(), plain.disable_adapter():  # the base model alone
            assert torch.equal(fused(x), plain(x))
            assert not torch.allclose(fused(x), with_adapters, atol=1e-2)
        fused.merge_adapter()
        assert torch.allclose(fused(x), with_adapters, atol=1e-5)


def test_lora_layers_are_fused_and_can_be_switched_off():
    keys = {}
    for switch, name in (("true", "FusedLoraLinear"), ("false", "Linear")):
        _, model, _, _ = tiny("lora=default", f"lora.fused={switch}")
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert layers and {type(m).__name__ for m in layers} == {name}
        keys[switch] = list(model.state_dict())
    assert keys["true"] == keys["false"]  # same weights, same names: checkpoints load either way


# 24 MiB, well inside one glibc heap (64 MiB at most for an arena other than the main one):
# with a 64 MiB block, one CI run faulted every page in again after the setting applied,
# though it passed on every run before; a block that size may not fit where it was freed.
BLOCK = 24 << 20
FRESH_PROCESS = r"""
import json, resource, sys
import torch
from instruct.train import keep_freed_memory, train
from tests.conftest import toy_config

def faults_of_a_second_allocation():
    torch.ones(BLOCK // 4).sum()  # freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(BLOCK // 4).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

data, out, BLOCK = sys.argv[1], sys.argv[2], int(sys.argv[3])
report = {"faults_default": faults_of_a_second_allocation()}
common = ["logger=none", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.samples=0"]
off = train(toy_config(data, out + "/off", "trainer.keep_freed_memory=false", *common))
report["applied"] = keep_freed_memory()
report["faults_kept"] = faults_of_a_second_allocation()
on = train(toy_config(data, out + "/on", *common))
report["histories"] = [[r["train_loss_history"], r["val_loss_history"]] for r in (off, on)]
print(json.dumps(report))
"""


def test_kept_freed_memory_is_reused_and_changes_no_number(toy_data, tmp_path):
    """glibc hands a freed 24 MiB block back to the OS, so allocating it again faults in every
    page; once kept, the second allocation reuses it. A run gives the same numbers either way.
    A fresh process, because the setting is process-wide and the default run turns it on."""
    import json
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("keep_freed_memory tunes glibc's malloc; this is not a glibc system")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(toy_data), str(tmp_path), str(BLOCK)],
        capture_output=True, text=True, timeout=600, check=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["applied"]
    pages = BLOCK // 4096
    assert report["faults_default"] > pages // 2  # fresh pages each time
    assert report["faults_kept"] < pages // 20  # the freed block again
    off, on = report["histories"]
    assert off == on


def test_a_wrapped_model_computes_logits_only_at_supervised_positions():
    """A wrapper (as DDP is) whose forward must run: logits_to_keep gives the same loss."""
    _, model, tokenizer, features = tiny("lora=none")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, **kwargs):
            kept.append(kwargs.get("logits_to_keep"))
            return self.module(**kwargs)

    kept: list = []
    row = pack(features)
    direct, n = loss_sum(model, row)
    wrapped, m = loss_sum(Wrapper(model), row)
    assert n == m and torch.allclose(direct, wrapped, rtol=1e-5)
    assert len(kept[0]) == n  # one position per supervised token, not the whole row
