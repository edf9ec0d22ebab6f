"""Audio tower parity with transformers' Gemma3nAudioEncoder on the same random weights."""

import numpy as np
import pytest
import torch

from gemma3n.audio import AudioFeatureExtractor, soft_tokens_for_duration
from gemma3n.audio_encoder import AudioEncoder
from gemma3n.errors import CheckpointError

transformers = pytest.importorskip("transformers")
from transformers import Gemma3nAudioConfig  # noqa: E402
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder  # noqa: E402

SMALL = dict(
    hidden_size=64,
    input_feat_size=32,
    conf_num_hidden_layers=2,
    conf_num_attention_heads=4,
    sscp_conv_channel_size=[16, 8],
)


def hf_encoder(seed: int = 0, **overrides) -> tuple[Gemma3nAudioEncoder, dict]:
    """A small HF audio tower whose every weight is random (not the identity-ish init)."""
    torch.manual_seed(seed)
    config = Gemma3nAudioConfig(**{**SMALL, **overrides})
    model = Gemma3nAudioEncoder(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.2 * torch.randn_like(p))
    return model, config.to_dict()


def run_both(hf, ours, features, mask):
    with torch.inference_mode():
        ref = hf(features, ~mask)  # HF takes True = padding
        out, padding = ours(features, mask)
    return ref.last_hidden_state, ref.audio_mel_mask, out, padding


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"conf_attention_chunk_size": 4, "conf_attention_context_left": 6, "conf_attention_context_right": 2},
    ],
    ids=["shipped-attention", "future-context"],
)
def test_encoder_matches_transformers_batched_with_padding(overrides):
    hf, config = hf_encoder(**overrides)
    ours = AudioEncoder.from_state_dict(hf.state_dict(), config)
    features = torch.randn(2, 203, 32)
    mask = torch.ones(2, 203, dtype=torch.bool)
    mask[1, 77:] = False
    ref, ref_padding, out, padding = run_both(hf, ours, features, mask)
    assert out.shape == ref.shape == (2, 13, 64)
    assert torch.equal(padding, ref_padding) and padding[1].sum() == 8
    assert rel_err(out, ref) <= 1e-4
    assert (out[padding] == 0).all()


@pytest.mark.parametrize("frames", [1, 11, 97, 250])
def test_encoder_matches_transformers_single_clip(frames):
    hf, config = hf_encoder(seed=frames)
    ours = AudioEncoder.from_state_dict(hf.state_dict(), config)
    features = torch.randn(1, frames, 32)
    ref, ref_padding, out, padding = run_both(hf, ours, features, torch.ones(1, frames, dtype=torch.bool))
    assert out.shape == ref.shape and torch.equal(padding, ref_padding)
    assert rel_err(out, ref) <= 1e-4


def test_pipeline_from_waveforms_with_config_driven_sizes():
    """Extractor (mel bins from its config) -> encoder, against the HF pair, for 1 s and 2.3 s clips."""
    from transformers import Gemma3nAudioFeatureExtractor

    hf, config = hf_encoder(seed=3)
    ours = AudioEncoder.from_state_dict(hf.state_dict(), config)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 36800)]
    features, mask = AudioFeatureExtractor(feature_size=32)(clips)
    hf_in = Gemma3nAudioFeatureExtractor(feature_size=32)(clips, return_tensors="pt")
    assert torch.equal(mask, hf_in["input_features_mask"])
    ref, ref_padding, out, padding = run_both(hf, ours, hf_in["input_features"], mask)
    assert rel_err(out, ref) <= 1e-4 and torch.equal(padding, ref_padding)
    assert (~padding).sum(1).tolist() == [7, 15]  # padded batch: the 1 s clip keeps its 7 tokens


def test_token_counts_per_clip_length():
    hf, config = hf_encoder(hidden_size=16, conf_num_hidden_layers=1, conf_num_attention_heads=2)
    ours = AudioEncoder.from_state_dict(hf.state_dict(), config)
    fe = AudioFeatureExtractor(feature_size=32)
    for seconds, tokens in ((1, 7), (10, 63), (30, 188)):
        frames = fe.num_frames(seconds * 16000)
        with torch.inference_mode():
            out, _ = ours(torch.randn(1, frames, 32), torch.ones(1, frames, dtype=torch.bool))
        assert out.shape[1] == tokens == soft_tokens_for_duration(seconds, fe, config)


def test_strict_loading_lists_every_problem():
    hf, config = hf_encoder()
    sd = dict(hf.state_dict())
    del sd["conformer.1.lconv1d.linear_end.weight"]
    sd["conformer.0.extra.weight"] = torch.zeros(3)
    sd["conformer.0.attention.attn.per_dim_scale"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        AudioEncoder.from_state_dict(sd, config)
    message = str(err.value)
    assert "missing (1): conformer.1.lconv1d.linear_end.weight" in message
    assert "unexpected (1): conformer.0.extra.weight" in message
    assert "wrong shape (1): conformer.0.attention.attn.per_dim_scale: checkpoint [7], expected [16]" in message


def test_load_casts_and_shares_weights(monkeypatch):
    import gemma3n.layers as layers

    hf, config = hf_encoder()
    sd = hf.state_dict()
    same = AudioEncoder.from_state_dict(sd, config)
    w = "conformer.0.ffw_layer_start.ffw_layer_1.weight"
    assert same.state_dict()[w].data_ptr() == sd[w].data_ptr()  # no copy when dtype/device match
    features, mask = torch.randn(2, 40, 32), torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False

    # bf16 weights on a CPU: stored as bf16, computed in fp32 = the reference on bf16-rounded weights
    half = AudioEncoder.from_state_dict(sd, config, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters()) and half.compute_dtype == torch.float32
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    # matmuls in fp32 (weights widened per matmul): the reference to fp32 rounding
    monkeypatch.setattr(layers, "gemm_dtype", lambda device, dtype: torch.float32)
    ref, ref_padding, out, padding = run_both(hf, half, features, mask)
    assert out.dtype == torch.float32 and torch.equal(padding, ref_padding)
    assert rel_err(out, ref) <= 1e-4
    # matmuls in bf16 (what CPUs with bf16 units run, hardware.py): bf16-close
    monkeypatch.setattr(layers, "gemm_dtype", lambda device, dtype: torch.bfloat16)
    _, _, out, _ = run_both(hf, half, features, mask)
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 3e-2

    bf16 = AudioEncoder.from_state_dict(sd, config, dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    with torch.inference_mode():
        out, _ = bf16(features, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
