"""The fused LoRA layer gives peft's outputs and gradients, falls back to peft where it does
not apply, and trains the run peft's layers train."""

from __future__ import annotations

import pytest
import torch

from instruct.kernels.dropout import DropoutDrawer
from instruct.kernels.fused_lora import fuse_lora
from instruct.train import train
from tests.conftest import toy_config
from tests.kernels.tiny import tiny


@pytest.mark.slow
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


class FixedMaskDropout(torch.nn.Module):
    """``nn.Dropout`` with a given mask, for comparing peft's layer with the fused one."""

    def __init__(self, keep: torch.Tensor, p: float) -> None:
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep / (1 - self.p) if self.training else x


class GivenDraws(DropoutDrawer):
    """Draws the given keep masks in turn, as masks or as the positions they drop, and
    records which way each was drawn."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.masks: list[torch.Tensor] = []
        self.kinds: list[str] = []

    def keep_mask(self, shape: torch.Size, p: float, device) -> torch.Tensor:
        self.kinds.append("mask")
        return self.masks.pop(0)

    def dropped_positions(self, n: int, p: float, batch: int | None = None) -> torch.Tensor:
        self.kinds.append("positions")
        keep = self.masks.pop(0)
        assert keep.numel() == n
        return (~keep).flatten().nonzero().squeeze(1)


def two_lora_mlps(p: float, bias: bool, drawer: DropoutDrawer | None = None):
    """The same small MLP with LoRA twice: peft's layers and the fused ones."""
    from peft import LoraConfig, get_peft_model

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
    assert fuse_lora(models[1], drawer) == 2
    return models


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("p, draw", [(0.0, "auto"), (0.25, "mask"), (0.25, "positions")])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_layer_gives_peft_output_and_gradients(precision, p, draw, bias):
    """For the same dropout masks: the fused layers' output and the gradients of the input,
    the adapters and a trainable bias are peft's, in fp32 to float noise; in bf16 no further
    from the fp32 figures than peft's own bf16 ones (bf16 rounds in different places). The
    masks reach the fused layers as masks or as the positions of the dropped elements."""
    check_fused_lora_layer(precision, p, draw, bias, "cpu", fp32_tolerance=1e-5)


def check_fused_lora_layer(
    precision: str, p: float, draw: str, bias: bool, device: str, fp32_tolerance: float
) -> None:
    """The fused layers against peft's on ``device`` with the same dropout masks: in fp32
    within ``fp32_tolerance`` of each tensor's scale, in bf16 no further from peft's fp32
    figures than twice peft's own bf16 error plus 1e-3 of the scale. Off the CPU every draw
    is a mask (:meth:`DropoutDrawer.draw`)."""
    drawer = GivenDraws(draw)
    plain, fused = (m.to(device) for m in two_lora_mlps(p, bias, drawer))
    for model in (plain, fused):
        for layer in model.base_model.model[::2]:
            if bias:
                layer.get_base_layer().bias.requires_grad_(True)  # a frozen bias's gradient too
    x = torch.randn(3, 10, 48).to(device)
    masks = [(torch.rand(3, 10, 48) >= p).to(device), (torch.rand(3, 10, 40) >= p).to(device)]
    for layer, keep in zip(plain.base_model.model[::2], masks, strict=True):
        if p > 0:
            layer.lora_dropout["default"] = FixedMaskDropout(keep, p)
    drawn = draw if device == "cpu" else "mask"

    def run(model, bf16):
        drawer.masks, drawer.kinds = list(masks), []
        model.train()
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = model(xi)
        (out.float() * torch.linspace(-1, 1, 24, device=device)).sum().backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}
        assert len(grads) == 4 + 2 * bias
        if model is fused and p > 0:
            assert drawer.kinds == [drawn, drawn]  # both layers drew as asked
        return {"out": out.float(), "x": xi.grad, **grads}

    reference, ours = run(plain, False), run(fused, precision == "bf16")
    assert type(fused.base_model.model[0]).__name__ == "FusedLoraLinear"
    assert sorted(ours) == sorted(reference)
    peft_bf16 = run(plain, True) if precision == "bf16" else None
    for name, want in reference.items():
        scale = want.abs().max()
        error = (ours[name] - want).abs().max()
        if peft_bf16 is None:
            assert error <= fp32_tolerance * scale, name
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


def test_the_fused_layers_of_a_model_share_the_drawer_the_config_names():
    _, model, _, _ = tiny("lora=default", "lora.dropout_draw=mask")
    layers = [m for m in model.modules() if hasattr(m, "dropout_drawer")]
    assert layers and all(m.dropout_drawer is layers[0].dropout_drawer for m in layers)
    assert layers[0].dropout_drawer.how == "mask"
