"""Speech input end to end: a small random Gemma 3n (text + audio + vision) saved by transformers,
prompted with audio through `gemma3n.load(...).generate(messages=...)`, against
`Gemma3nProcessor.apply_chat_template` + `Gemma3nForConditionalGeneration` on the same weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import gemma3n
from tests.conftest import SMALL_TEXT, randomize_, write_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("PIL")

MEDIA_TOKENS = {
    "image_token": "<image_soft_token>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "audio_token": "<audio_soft_token>",
    "boa_token": "<start_of_audio>",
    "eoa_token": "<end_of_audio>",
}
TEXT_VOCAB = 512  # the test tokenizer's size; ids [512, 640) are vision, [640, 768) audio
AUDIO_TOKENS = 24  # soft tokens per clip (188 in the real model): > the 15 of a 2.3 s clip, so padding is used


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.2 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(HF model, HF processor, checkpoint dir)."""
    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nProcessor,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
    )

    from gemma3n.processing import GEMMA_TEMPLATE
    from tests.test_vision import tiny_vision_config

    path: Path = tmp_path_factory.mktemp("g3n-audio") / "ckpt"
    path.mkdir()
    write_tokenizer(path)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "extra_special_tokens": MEDIA_TOKENS}))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    ids = {f"{k}_id": tokenizer.convert_tokens_to_ids(v) for k, v in MEDIA_TOKENS.items()}

    vision = dict(tiny_vision_config(), vocab_offset=TEXT_VOCAB)
    audio = dict(
        hidden_size=32,
        conf_num_hidden_layers=2,
        conf_num_attention_heads=4,
        sscp_conv_channel_size=[8, 4],
        vocab_offset=TEXT_VOCAB + 128,
    )
    text = dict(SMALL_TEXT, vocab_size=TEXT_VOCAB + 256, vocab_size_per_layer_input=TEXT_VOCAB)
    config = Gemma3nConfig(
        text_config=text,
        audio_config=audio,
        vision_config=copy.deepcopy(vision),
        audio_soft_tokens_per_image=AUDIO_TOKENS,
        **ids,
    )
    torch.manual_seed(0)
    hf = Gemma3nForConditionalGeneration(config).eval()
    randomize_(hf, seed=0)
    with torch.no_grad():
        # as in the official checkpoints, the rows of the media vocabularies copy the <pad> row (§D.2)
        table = hf.model.language_model.embed_tokens.weight
        table[TEXT_VOCAB:] = table[0]
    hf.config.vision_config.model_args = copy.deepcopy(vision["model_args"])  # timm edits it in place
    hf.save_pretrained(path)
    processor = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=SiglipImageProcessor(size={"height": 64, "width": 64}, do_normalize=False),
        tokenizer=tokenizer,
        chat_template=GEMMA_TEMPLATE,
        audio_seq_length=AUDIO_TOKENS,
    )
    processor.save_pretrained(path)
    return hf, processor, path


def _messages(*clips: np.ndarray) -> list[dict]:
    parts = [{"type": "audio", "audio": c} for c in clips]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Transcribe"}]}]


@pytest.mark.parametrize("seconds", [[1.7], [1.0, 2.3]], ids=["one-clip", "two-clips-padded"])
def test_prompt_and_first_logits_match_transformers(checkpoint, seconds):
    hf, processor, path = checkpoint
    messages = _messages(*(_clip(s, i) for i, s in enumerate(seconds)))
    ref_in = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    model = gemma3n.load(path)
    inputs, embeds = model.prepare(messages=messages)
    assert inputs.ids == ref_in["input_ids"][0].tolist()
    assert embeds is not None
    with torch.no_grad():
        ref = hf(**ref_in).logits[0, -1]
        ids = torch.tensor([inputs.ids])
        hidden = model.decoder(ids, torch.arange(ids.shape[1]), plan=model.plan(), inputs_embeds=embeds)
        ours = model.decoder.lm_head(hidden[0, -1]).float()
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_greedy_generation_matches_transformers(checkpoint):
    hf, processor, path = checkpoint
    messages = _messages(_clip(1.7, 0))
    ref_in = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = hf.generate(**ref_in, max_new_tokens=8, do_sample=False)
    ref = out[0, ref_in["input_ids"].shape[1] :].tolist()
    model = gemma3n.load(path)
    stops = model.stop_ids()
    cut = next((i for i, t in enumerate(ref) if t in stops), len(ref))
    result = model.generate(messages=messages, temperature=0, max_tokens=8)
    assert result.token_ids == ref[:cut]
    assert len(result.token_ids) >= 4, "test is too weak: generation stopped early"
    assert not model.towers.has_vision or "model.embed_vision." not in model.towers.loaded()  # audio only


def test_decoding_a_media_range_id_uses_its_hard_embedding(checkpoint):
    from gemma3n.cache import Cache
    from gemma3n.generate import decode_one, prefill

    hf, _, path = checkpoint
    model = gemma3n.load(path)
    prompt, media_id = [2, 5, 40, 41, 42], TEXT_VOCAB + 128 + 60  # an audio-range id
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([[*prompt, media_id]])).logits[0, -1]
    plan = model.plan()
    cache = Cache(plan.config, plan.key)
    prefill(model.decoder, torch.tensor([prompt]), cache, plan)
    ours = decode_one(model.decoder, media_id, cache, plan, model.embed_ids)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4
