"""Audio prompts of any length, the context as their only limit, and audio files that hold less
than their header says: the whole clip reaches the model as consecutive 30 s windows, or one
clear error says why not, in the Python API, the CLI and the server alike."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import gemma3n
from gemma3n.audio import AudioFeatureExtractor, encoder_windows, load_audio
from gemma3n.cli import main
from gemma3n.errors import InputError
from tests.conftest import AUDIO_TOKENS

sf = pytest.importorskip("soundfile")
pytest.importorskip("transformers")
pytest.importorskip("timm")

SR = 16000
TRUNCATED = r"truncated or its header is wrong: the header declares [\d.]+ s but the file holds [\d.]+ s"


def _tone(seconds: float, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


def _encoded(wave: np.ndarray, fmt: str = "WAV", subtype: str | None = "PCM_16", sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _messages(*clips) -> list[dict]:
    parts = [{"type": "audio", "audio": c} for c in clips]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What do you hear?"}]}]


@pytest.fixture(scope="module")
def model(mm_checkpoint):
    return gemma3n.load(mm_checkpoint[2])


@pytest.fixture(scope="module")
def short_context(mm_checkpoint, tmp_path_factory) -> Path:
    """The multimodal test checkpoint with a 200-token context: a few windows of audio fill it."""
    src: Path = mm_checkpoint[2]
    dst = tmp_path_factory.mktemp("g3n-short") / "ckpt"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 200
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# --- the whole clip, in order --------------------------------------------------------------------


def test_a_clip_longer_than_30_s_is_every_window_in_order(model):
    """30 s of silence then 10 s of tone: two windows, two placeholder blocks, and the tone
    changes the prompt (it used to be cut off, giving exactly the silence's prompt)."""
    silence, clip = _silence(30), np.concatenate([_silence(30), _tone(10)])
    short, short_embeds = model.prepare(messages=_messages(silence))
    long, long_embeds = model.prepare(messages=_messages(clip))
    audio_id = model.config.audio_token_id

    assert len(short.audios) == 1 and len(long.audios) == 2
    assert np.array_equal(np.concatenate(long.audios), clip)  # every sample, once, in order
    assert all(len(w) <= 30 * SR for w in long.audios)
    assert short.ids.count(audio_id) == 1 * AUDIO_TOKENS
    assert long.ids.count(audio_id) == 2 * AUDIO_TOKENS
    (boa,) = model.tokenizer.encode("<start_of_audio>")
    assert long.ids.count(boa) == 2  # one block per window, not one longer block

    # block 2 holds the tail window's soft tokens, as that window alone would give them
    blocks = long_embeds[0][torch.tensor(long.ids) == audio_id].reshape(2, AUDIO_TOKENS, -1)
    tail, tail_embeds = model.prepare(messages=_messages(long.audios[1]))
    alone = tail_embeds[0][torch.tensor(tail.ids) == audio_id]
    torch.testing.assert_close(blocks[1], alone, atol=1e-4, rtol=1e-4)
    assert (blocks[1] - blocks[0]).abs().max() > 1e-2  # the tone is not the silence

    def last_logits(inputs, embeds):
        hidden = model.decoder(
            torch.tensor([inputs.ids]), torch.arange(len(inputs.ids)), plan=model.plan(), inputs_embeds=embeds
        )
        return model.decoder.lm_head(hidden[0, -1]).float()

    with torch.no_grad():
        assert (last_logits(long, long_embeds) - last_logits(short, short_embeds)).abs().max() > 1e-3

    result = model.generate(messages=_messages(clip), max_tokens=3, temperature=0)
    assert result.prompt_tokens == len(long.ids) and len(result.token_ids) >= 1


def test_windows_touch_and_cut_at_quiet_points():
    fe = AudioFeatureExtractor()
    speechy = _tone(95, freq=300) * (np.sin(np.arange(95 * SR) / SR * 2 * np.pi / 7) > -0.3)  # pauses
    for wave in (speechy, _tone(61, seed=3), _silence(90.5), _tone(12)):
        windows = encoder_windows(wave, fe)
        assert np.array_equal(np.concatenate(windows), wave)
        assert all(len(w) <= 30 * SR for w in windows)
        assert len(windows) == 1 or all(len(w) >= 1 * SR for w in windows)
    assert [len(w) / SR for w in encoder_windows(_silence(90.5), fe)] == [30, 30, 29.5, 1]


# --- the context is the only limit ---------------------------------------------------------------


def _fits(message: str) -> tuple[int, float]:
    m = re.search(r"at most (\d+) windows fit with this text, i\.e\. at most ([\d.]+) s of audio", message)
    assert m, message
    return int(m.group(1)), float(m.group(2))


def test_audio_beyond_the_context_says_how_many_seconds_fit(short_context):
    model = gemma3n.load(short_context)
    with pytest.raises(InputError) as e:
        model.prepare(messages=_messages(_silence(400)))
    msg = str(e.value)
    assert "400.0 s of audio need 14 windows of up to 30 s" in msg and "context is 200 tokens" in msg
    windows, seconds = _fits(msg)
    assert windows >= 2 and seconds == 30 * windows
    inputs, _ = model.prepare(messages=_messages(_silence(seconds)))  # exactly what it said fits
    assert len(inputs.audios) == windows and len(inputs.ids) < 200
    with pytest.raises(InputError, match="at most"):
        model.prepare(messages=_messages(_silence(seconds + 5)))
    # two clips share the budget; the message counts both
    with pytest.raises(InputError, match=rf"{seconds + 35:.1f} s of audio need {windows + 2} windows"):
        model.prepare(messages=_messages(_silence(seconds), _silence(35)))


def test_text_that_leaves_no_room_for_audio(short_context):
    model = gemma3n.load(short_context)
    long_text = " ".join(["word"] * 400)
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio": _tone(1)}, {"type": "text", "text": long_text}]}
    ]
    with pytest.raises(InputError, match="the text leaves no room for any audio"):
        model.prepare(messages=messages)


def test_hours_of_audio_are_refused_from_the_header_before_decoding(short_context, tmp_path, monkeypatch):
    model = gemma3n.load(short_context)
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(8000 * 600, np.uint8).astype(np.float32), 8000, subtype="PCM_U8")  # 10 min, 4.8 MB

    def never(*args, **kwargs):
        raise AssertionError("decoded although the header already says it cannot fit")

    monkeypatch.setattr("gemma3n.processing.load_audio", never)
    with pytest.raises(InputError, match=r"600\.0 s of audio \(as its header declares\) need at least 20 windows"):
        model.prepare(messages=_messages(str(path)))


# --- headers that claim more than the file holds -------------------------------------------------


def _lying_wav() -> bytes:
    data = bytearray(_encoded(_tone(2)))
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", 10 * struct.unpack("<I", data[at + 4 : at + 8])[0])
    return bytes(data)


def _truncated(fmt: str) -> bytes:
    data = _encoded(_tone(4), fmt, "PCM_16" if fmt in ("WAV", "FLAC") else None)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "make,match",
    [
        (_lying_wav, TRUNCATED),
        (lambda: _truncated("WAV"), TRUNCATED),
        (lambda: _encoded(_tone(2))[:44], TRUNCATED),  # the header only
        (lambda: _truncated("FLAC"), r"cannot decode audio .*truncated, corrupt or not audio"),
        (lambda: _truncated("MP3"), TRUNCATED),  # its Xing header counts the frames
        (lambda: _truncated("OGG"), r"is truncated: its Ogg stream ends before its end-of-stream page"),
        (lambda: b"RIFF....WAVEfmt garbage" * 40, r"cannot decode audio"),
        (lambda: b"\x00" * 5000, r"cannot decode audio"),
    ],
    ids=[
        "lying-wav",
        "truncated-wav",
        "header-only-wav",
        "truncated-flac",
        "truncated-mp3",
        "truncated-ogg",
        "garbage",
        "zeros",
    ],
)
def test_audio_holding_less_than_its_header_says_is_an_error(make, match, tmp_path):
    data = make()
    with pytest.raises(InputError, match=match):
        load_audio(data)
    path = tmp_path / "clip.audio"
    path.write_bytes(data)
    with pytest.raises(InputError, match=match):
        load_audio(path)


def test_headers_that_do_not_lie_are_accepted():
    wave = _tone(2)
    data = bytearray(_encoded(wave))
    at = data.find(b"data")
    piped = bytearray(data)  # a WAV written to a pipe: sizes unknown, 0xFFFFFFFF
    piped[4:8] = piped[at + 4 : at + 8] = b"\xff\xff\xff\xff"
    sloppy = bytearray(data)  # a RIFF size 8 bytes too large (a common writer bug): nothing is missing
    sloppy[4:8] = struct.pack("<I", struct.unpack("<I", sloppy[4:8])[0] + 8)
    for variant in (data, piped, sloppy):
        assert len(load_audio(bytes(variant))) == len(wave)
    assert len(load_audio(_encoded(wave, "FLAC"))) == len(wave)


def test_a_lying_header_is_one_clear_line_in_the_cli_and_the_api(model, mm_checkpoint, tmp_path, capsys):
    path = tmp_path / "lying.wav"
    path.write_bytes(_lying_wav())
    with pytest.raises(InputError, match=TRUNCATED):
        model.generate(messages=_messages(str(path)), max_tokens=2)
    rc = main(
        ["generate", "--model", str(mm_checkpoint[2]), "--audio", str(path), "--prompt", "hi", "--max-tokens", "2"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("gemma3n: error: audio") and re.search(TRUNCATED, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_cli_generate_takes_a_long_audio_file(mm_checkpoint, tmp_path, capsys):
    path = tmp_path / "long.flac"
    sf.write(path, np.concatenate([_silence(30), _tone(10)]), SR, format="FLAC")
    argv = ["generate", "--model", str(mm_checkpoint[2]), "--audio", str(path), "--prompt", "hi"]
    assert main([*argv, "--max-tokens", "2", "--temp", "0", "--verbose"]) == 0
    assert "prompt: " in capsys.readouterr().err


# --- the server's input_audio ---------------------------------------------------------------------


def test_server_input_audio_of_any_length(model, short_context):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gemma3n.server import create_app

    clip = np.concatenate([_silence(30), _tone(10)])
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(_encoded(clip)).decode(), "format": "wav"}}
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What do you hear?"}]}]}
    direct = model.generate(messages=_messages(_encoded(clip)), max_tokens=2, temperature=0)
    with TestClient(create_app(model)) as client:
        r = client.post("/v1/chat/completions", json={**body, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == direct.prompt_tokens
    assert r.json()["choices"][0]["message"]["content"] == direct.text

    small = gemma3n.load(short_context)
    long_part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(_encoded(_silence(400))).decode()}}
    with TestClient(create_app(small)) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [long_part]}]})
        assert r.status_code == 400 and "s of audio" in r.json()["error"]["message"]
        windows, seconds = _fits(r.json()["error"]["message"])
        lying = {"type": "input_audio", "input_audio": {"data": base64.b64encode(_lying_wav()).decode()}}
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [lying]}]})
        assert r.status_code == 400 and re.search(TRUNCATED, r.json()["error"]["message"])
    assert seconds == 30 * windows
