"""Backbones: output shapes, parameter counts, and the standardising first layer."""

from __future__ import annotations

import pytest
import torch

from digitnet.errors import DigitnetError
from digitnet.models import BACKBONES, PerImageStandardize, build_backbone
from digitnet.models.dropout import Dropout


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("num_classes", [10, 3])
def test_output_shape(name, num_classes):
    model = build_backbone(name, num_classes=num_classes).eval()
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, num_classes)


def test_classic_parameter_counts():
    # 784*128+128 + 128*64+64 + 64*10+10 and the PyTorch MNIST example's 1,199,882
    assert n_params(build_backbone("mlp")) == 109_386
    assert n_params(build_backbone("cnn")) == 1_199_882


@pytest.mark.parametrize(
    "name, narrow, wide",
    [
        ("resnet", {"widths": [16, 32, 64]}, {"widths": [32, 64, 128]}),
        ("convnext", {"dims": [16, 32, 64]}, {"dims": [32, 64, 128]}),
    ],
)
def test_width_is_a_config_key(name, narrow, wide):
    small, large = n_params(build_backbone(name, **narrow)), n_params(build_backbone(name, **wide))
    assert 50_000 < large < 1_000_000  # small enough for a 2-core CPU, big enough to learn
    assert 3.5 < large / small < 4.1  # conv weights grow with width squared


def test_convnext_depth_adds_blocks():
    shallow = build_backbone("convnext", depths=[1, 1, 1])
    deep = build_backbone("convnext", depths=[2, 2, 2])
    blocks = lambda m: sum(type(x).__name__ == "ConvNeXtBlock" for x in m.modules())  # noqa: E731
    assert (blocks(shallow), blocks(deep)) == (3, 6)


def test_unknown_model_and_keys_are_clear():
    with pytest.raises(DigitnetError, match="unknown model 'vit'"):
        build_backbone("vit")
    with pytest.raises(DigitnetError, match="bad settings for model=cnn"):
        build_backbone("cnn", widths=[1])


def test_standardize_ignores_pixel_scale_and_survives_blank_images():
    x = torch.rand(4, 1, 28, 28)
    layer = PerImageStandardize()
    out = layer(x)
    assert torch.allclose(layer(x * 255), out, atol=1e-4)
    assert torch.allclose(layer(out), out, atol=1e-4)
    assert torch.allclose(out.mean((1, 2, 3)), torch.zeros(4), atol=1e-5)
    blank = layer(torch.full((1, 1, 28, 28), 7.0))
    assert torch.isfinite(blank).all() and blank.abs().max() == 0


def test_dropout_keeps_each_value_with_probability_1_minus_p_and_rescales():
    torch.manual_seed(0)
    dropout = Dropout(0.25)
    x = torch.ones(64, 64, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    out = dropout(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 590k draws: the standard error is 0.0006
    assert torch.allclose(out[kept], torch.tensor(1 / 0.75))
    assert out.is_contiguous(memory_format=torch.channels_last)  # no layout change for the layers around it
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the same mask and scale on the way back
    strided = torch.ones(100, 400)[:, ::2]  # not dense: the mask takes its own layout
    assert abs((dropout(strided) != 0).float().mean().item() - 0.75) < 0.01
    dropout.eval()
    assert dropout(x) is x


def test_dropout_draws_from_torchs_seeded_generator():
    dropout = Dropout(0.5)
    x = torch.ones(1000)
    torch.manual_seed(1)
    first = dropout(x)
    torch.manual_seed(1)
    assert torch.equal(dropout(x), first) and not torch.equal(dropout(x), first)
