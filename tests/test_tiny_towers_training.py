"""The towers' training recipe (tools/pretrain_tiny_towers.py): SpecAugment's masks must not
leave the subsampler an all-zero first step, whose gradient the conformer's RMSNorms blow up."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from gemma3n.audio_encoder import CumulativeGroupNorm, SSCPConvBlock

pytest.importorskip("timm")
# the training tool makes the subsampler differentiable by replacing two methods when imported;
# the rest of the suite keeps the runtime's own (restored here, put back per test below)
_RUNTIME = SSCPConvBlock.forward, CumulativeGroupNorm.scale_shift
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from pretrain_tiny_towers import spec_augment  # noqa: E402
from train_tiny_media import init_audio_tower  # noqa: E402

_TRAINING = SSCPConvBlock.forward, CumulativeGroupNorm.scale_shift
SSCPConvBlock.forward, CumulativeGroupNorm.scale_shift = _RUNTIME


@pytest.fixture(autouse=True)
def _differentiable_subsampler(monkeypatch):
    monkeypatch.setattr(SSCPConvBlock, "forward", _TRAINING[0])
    monkeypatch.setattr(CumulativeGroupNorm, "scale_shift", _TRAINING[1])


def _backward_is_finite(feats: torch.Tensor) -> bool:
    tower = init_audio_tower(seed=0)
    soft, padding = tower(feats, torch.ones(feats.shape[:2], dtype=torch.bool))
    (soft.sin().sum()).backward()
    return all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)


def test_masks_take_the_clips_mean_and_keep_the_gradient_finite():
    torch.manual_seed(0)
    feats = torch.randn(2, 400, 128) - 2.0  # log-mel-like: mean about -2
    masked = spec_augment(feats, random.Random(0))
    changed = masked != feats
    assert changed.any()
    for b in range(2):
        assert torch.allclose(masked[b][changed[b]], feats[b].mean().expand(int(changed[b].sum())))
    # a time mask at the very start, as spec_augment may draw it: with zeros the first step of
    # the subsampler is exactly 0 and the gradient overflows; with the clip's mean it does not
    start_zero, start_mean = feats.clone(), feats.clone()
    start_zero[:, :10] = 0
    start_mean[:, :10] = feats.mean((1, 2), keepdim=True)
    assert not _backward_is_finite(start_zero)
    assert _backward_is_finite(start_mean)
