"""The embedded model sees: its trained MobileNet-V5-shaped vision tower (tools/train_tiny_media.py)
answers about the shipped image and about unseen scenes, through the Python API, the CLI and the
server's OpenAI `image_url` parts. Greedy fp32 decoding; the pinned answers are the trained model's
(update them with the model). Its ears: tests/test_tiny_speech.py."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("PIL")
pytest.importorskip("timm")

import gemma3n  # noqa: E402
from tools.tiny_media_data import QUESTIONS, normalize_words, render_scene  # noqa: E402

MEDIA = Path(__file__).resolve().parents[1] / "docs" / "media"
IMAGE = MEDIA / "three-blue-triangles.png"  # a scene no training step drew
ANSWERS = {"colour": "blue", "shape": "triangle", "count": "three"}
UNSEEN_SEED = 2_000_000  # scenes from seeds neither the training stream nor its evaluations use


@pytest.fixture(scope="module")
def model():
    return gemma3n.load()


def ask(model, image, question: str, size: int | None = None) -> str:
    return model.generate(
        messages=[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}],
        image_size=size,
        max_tokens=6,
        temperature=0,
    ).text


def test_embedded_model_has_a_vision_tower_loaded_on_demand(model):
    config = json.loads((model.path / "config.json").read_text())
    assert config["model_type"] == "gemma3n" and config["vision_config"]["architecture"] == "mobilenetv5_300m_enc"
    assert model.has_vision
    fresh = gemma3n.load()
    fresh.generate("In the beginning", max_tokens=2, temperature=0)
    assert fresh.towers.loaded() == []  # text alone reads no tower


@pytest.mark.parametrize("task", list(ANSWERS))
@pytest.mark.parametrize("size", [256, 512, 768])
def test_answers_about_the_shipped_image(model, task, size):
    assert ask(model, str(IMAGE), QUESTIONS[task], size) == ANSWERS[task]


def test_answers_about_unseen_scenes_at_768_px(model):
    """The issue's bar (>= 90 % at 768 px) on 12 scenes x 3 questions no training step drew."""
    right = total = 0
    for i in range(12):
        img, scene = render_scene(random.Random(UNSEEN_SEED + i), 384)
        for task in ANSWERS:
            right += normalize_words(ask(model, img, QUESTIONS[task], 768)) == scene.answer(task)
            total += 1
    assert right / total >= 0.9, f"{right} / {total}"


def test_cli_answers_about_an_image(capsys):
    from gemma3n.cli import main

    assert main(["generate", "--image", str(IMAGE), "-p", QUESTIONS["colour"], "--temp", "0"]) == 0
    assert capsys.readouterr().out.strip() == ANSWERS["colour"]


def test_server_takes_an_image_url_part(model):
    from fastapi.testclient import TestClient

    from gemma3n.server import create_app

    png = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    with TestClient(create_app(model)) as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "gemma3n-tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": png}},
                            {"type": "text", "text": QUESTIONS["count"]},
                        ],
                    }
                ],
                "max_tokens": 6,
                "temperature": 0,
            },
        )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip() == ANSWERS["count"]
