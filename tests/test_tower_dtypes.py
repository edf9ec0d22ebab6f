"""The towers' dtype policy on the shared random multimodal checkpoint: a bf16 load computes the
vision tower in `hardware.tower_compute_dtype` and the audio encoder's matmuls in
`hardware.gemm_dtype` (bf16 where this CPU has bf16 units, fp32 where it has not), and the
merged soft tokens stay close to the fp32 load's. The fp32 path itself is checked against
transformers in test_vision*.py and test_audio*.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gemma3n
from gemma3n import hardware

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP fork/join on busy cores dominates
    yield
    torch.set_num_threads(n)


def _messages() -> list[dict]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128]
    image = np.stack([xx * 2, yy * 2, np.full_like(xx, 90)], -1) + rng.integers(-30, 30, (96, 128, 3))
    t = np.arange(int(1.6 * 16000)) / 16000
    clip = 0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) + 0.02 * rng.standard_normal(t.size)
    parts = [
        {"type": "image", "image": Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))},
        {"type": "audio", "audio": clip.astype(np.float32)},
        {"type": "text", "text": "Describe both"},
    ]
    return [{"role": "user", "content": parts}]


def test_bf16_towers_follow_the_policy_and_stay_close_to_fp32(mm_checkpoint):
    _, _, path = mm_checkpoint
    messages = _messages()
    fp32 = gemma3n.load(path)
    bf16 = gemma3n.load(path, dtype=torch.bfloat16)
    inputs, ref = fp32.prepare(messages=messages)
    inputs16, got = bf16.prepare(messages=messages)
    assert inputs.ids == inputs16.ids and ref is not None and got is not None

    vision, audio = bf16.towers.vision_tower(), bf16.towers.audio_tower()
    assert vision.compute_dtype == hardware.tower_compute_dtype(CPU, torch.bfloat16)
    assert audio.compute_dtype == torch.float32  # the residual stream and the attention stay fp32
    assert audio.gemm_dtype == hardware.gemm_dtype(CPU, torch.bfloat16)
    assert fp32.towers.vision_tower().compute_dtype == fp32.towers.audio_tower().gemm_dtype == torch.float32

    ids = torch.tensor(inputs.ids)
    config = fp32.config
    hf_rel, hf_cos = _hf_bf16_image_error(mm_checkpoint, messages)
    # bf16 weights alone move the soft tokens by < 2 % of their largest value. bf16 activations
    # through this small random vision tower move them by several %, depending on the image;
    # what is reasonable is what the reference's own bf16 path does on the same weights.
    bf16_vision = vision.compute_dtype == torch.bfloat16
    limits = {
        "image": (max(1.5 * hf_rel, 0.02), 1 - 1.5 * (1 - hf_cos)) if bf16_vision else (0.02, 0.9995),
        "audio": (0.02, 0.9995),
    }
    for kind, token in (("image", config.image_token_id), ("audio", config.audio_token_id)):
        at = ids == token
        assert at.sum() > 0
        rel, cos = _errors(got[0, at], ref[0, at])
        max_rel, min_cos = limits[kind]
        assert rel < max_rel and cos > min_cos, (kind, rel, cos, "transformers bf16:", hf_rel, hf_cos)


def _errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got - ref| / max |ref|, the smallest cosine similarity of a token's two vectors)."""
    a, b = got.float().flatten(0, -2), ref.float().flatten(0, -2)
    return ((a - b).abs().max() / b.abs().max()).item(), F.cosine_similarity(a, b, dim=-1).min().item()


def _hf_bf16_image_error(mm_checkpoint, messages) -> tuple[float, float]:
    """How far transformers' bf16 model puts the image's soft tokens from its fp32 ones."""
    hf, processor, _ = mm_checkpoint
    pixels = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        ref = hf.model.get_image_features(pixels).pooler_output
        got = copy.deepcopy(hf).to(torch.bfloat16).model.get_image_features(pixels.bfloat16()).pooler_output
    return _errors(got, ref)


def test_frames_go_through_the_tower_in_batches(mm_checkpoint, monkeypatch):
    """Images beyond the batch for their size are encoded in several calls, with the same soft tokens."""
    from gemma3n import multimodal

    _, _, path = mm_checkpoint
    model = gemma3n.load(path)
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)) for _ in range(3)]
    messages = [
        {"role": "user", "content": [*({"type": "image", "image": f} for f in frames), {"type": "text", "text": "?"}]}
    ]
    assert [multimodal.vision_batch(s, s) for s in (256, 512, 768)] == [8, 2, 1]
    calls = []
    tower = model.towers.vision_tower()
    monkeypatch.setattr(tower, "forward", lambda x, f=tower.forward: calls.append(x.shape[0]) or f(x))
    monkeypatch.setattr(multimodal, "vision_batch", lambda h, w: 3)
    _, whole = model.prepare(messages=messages)
    monkeypatch.setattr(multimodal, "vision_batch", lambda h, w: 2)
    _, batched = model.prepare(messages=messages)
    assert calls == [3, 2, 1]
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-5)
