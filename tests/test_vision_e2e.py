"""Image input end to end: a small random Gemma 3n (text + audio + vision) saved by transformers,
prompted with images through `gemma3n.load(...).generate(messages=...)`, against
`Gemma3nProcessor.apply_chat_template` + `Gemma3nForConditionalGeneration` on the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gemma3n
from tests.conftest import IMAGE_TOKENS, last_token_logits

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP fork/join on 2 busy cores dominates
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoint(mm_checkpoint):
    """(HF model, HF processor, checkpoint dir): the shared text + audio + vision checkpoint."""
    return mm_checkpoint


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 40 * seed)], -1)
    noisy = base + rng.integers(-30, 30, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _messages(*images: Image.Image) -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe"}]}]


def _hf_inputs(processor, messages):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@pytest.mark.parametrize("sizes", [[(90, 150)], [(200, 120), (64, 64)]], ids=["one-image", "two-images"])
def test_prompt_and_first_logits_match_transformers(checkpoint, sizes):
    hf, processor, path = checkpoint
    messages = _messages(*(_image(i, s) for i, s in enumerate(sizes)))
    ref_in = _hf_inputs(processor, messages)
    model = gemma3n.load(path)
    inputs, embeds = model.prepare(messages=messages)
    assert inputs.ids == ref_in["input_ids"][0].tolist()
    assert inputs.ids.count(hf.config.image_token_id) == IMAGE_TOKENS * len(sizes)
    assert embeds is not None
    with torch.no_grad():
        ref = hf(**ref_in).logits[0, -1]
    ours = last_token_logits(model, inputs.ids, embeds)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    # the image really reaches the logits: another picture changes them
    other = _messages(*(_image(i + 7, s) for i, s in enumerate(sizes)))
    _, embeds2 = model.prepare(messages=other)
    assert not torch.allclose(last_token_logits(model, inputs.ids, embeds2), ours, atol=1e-3)


def test_greedy_generation_matches_transformers(checkpoint):
    hf, processor, path = checkpoint
    messages = _messages(_image(3, (100, 160)))
    ref_in = _hf_inputs(processor, messages)
    with torch.no_grad():
        out = hf.generate(**ref_in, max_new_tokens=8, do_sample=False)
    ref = out[0, ref_in["input_ids"].shape[1] :].tolist()
    model = gemma3n.load(path)
    assert "vision_tower" not in model.towers.loaded()  # loaded only when a request has images
    stops = model.stop_ids()
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    result = model.generate(messages=messages, temperature=0, max_tokens=8)
    assert result.token_ids == ref[:cut]
    assert len(result.token_ids) >= 4, "test is too weak: generation stopped early"
    assert "vision_tower" in model.towers.loaded()
    assert not model.towers.has_audio or "audio_tower" not in model.towers.loaded()


def test_image_size_override(checkpoint):
    """--image-size: the same prompt layout (token count fixed by the tower), other pixels."""
    _, processor, path = checkpoint
    model = gemma3n.load(path)
    messages = _messages(_image(5, (120, 90)))
    a, ea = model.prepare(messages=messages)
    b, eb = model.prepare(messages=messages, image_size=64)
    assert a.ids == b.ids
    assert not torch.allclose(ea, eb)
