"""The VGG-style backbone: parameter count, convs per stage, and its head sized for any number of stages."""

from __future__ import annotations

import pytest
import torch

from digitnet.errors import DigitnetError
from digitnet.models import build_backbone


def test_convpool_parameter_count():
    # convs 1*16*9 + 16*32*9 + 32*64*9, BN scales and shifts 2*(16+32+64), head 64*3*3*10 + 10
    assert sum(p.numel() for p in build_backbone("convpool").parameters()) == 29_178


def test_convpool_head_fits_the_number_of_stages():
    two_stages = build_backbone("convpool", widths=[8, 16], num_classes=3)
    assert two_stages[-1].in_features == 16 * 7 * 7
    assert two_stages(torch.rand(2, 1, 28, 28)).shape == (2, 3)


def test_convpool_depth_stacks_convs_within_each_stage():
    net = build_backbone("convpool", widths=[8, 16], depth=2)
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 8), (8, 8), (8, 16), (16, 16)]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net) == 2
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_convpool_space_to_depth_folds_pixels_into_channels():
    net = build_backbone("convpool", widths=[8, 16, 32], space_to_depth=2)
    first_conv = next(m for m in net if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 4
    # 28 -> 14 px by the fold, then three poolings: 7, 3, 1
    assert net[-1].in_features == 32 * 1 * 1
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_convpool_pool_before_norm_pools_right_after_each_stages_last_conv():
    net = build_backbone("convpool", widths=[8, 16], depth=2, pool_before_norm=True)
    kinds = [type(m).__name__ for m in net if not isinstance(m, (torch.nn.Flatten, torch.nn.Dropout, torch.nn.Linear))]
    stage = ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    assert kinds == stage * 2
    seen = []
    for norm in (m for m in net if isinstance(m, torch.nn.BatchNorm2d)):
        norm.register_forward_hook(lambda _, inputs, __: seen.append(tuple(inputs[0].shape[-2:])))
    assert net(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    # each stage's second norm works on the pooled map
    assert seen == [(28, 28), (14, 14), (14, 14), (7, 7)]
    assert net[-1].in_features == 16 * 7 * 7


def test_convpool_global_pool_uses_every_position_of_the_last_map():
    net = build_backbone("convpool", widths=[8, 16, 32], space_to_depth=2, global_pool=True).eval()
    assert isinstance(net[-4], torch.nn.AdaptiveMaxPool2d) and net[-1].in_features == 32
    # the last map is 3x3; a 2x2 pool would never look at its last row or column, the global max does
    feats = torch.nn.Sequential(*list(net)[:-4])(torch.rand(1, 1, 28, 28))
    assert feats.shape[-2:] == (3, 3)
    assert torch.equal(net[-4](feats).flatten(), feats.amax(dim=(2, 3)).flatten())


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"widths": [8, 16, 32, 64], "space_to_depth": 2}, "4 stages"),
        ({"widths": [8] * 5}, "5 stages"),
        ({"widths": [8], "space_to_depth": 3}, "must divide"),
    ],
)
def test_convpool_refuses_settings_that_do_not_fit_the_image(settings, message):
    with pytest.raises(DigitnetError, match=message):
        build_backbone("convpool", **settings)
