"""Image and audio parts through the real server, on a small checkpoint that has both towers:
the answer equals `model.generate` on the same media."""

from __future__ import annotations

import base64
import io

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("timm")
pytest.importorskip("soundfile")

import gemma3n  # noqa: E402
from gemma3n.server import BackgroundServer, create_app  # noqa: E402
from tests.test_server_model import _png, _wav  # noqa: E402


@pytest.fixture(scope="module")
def served(mm_checkpoint):
    _, _, path = mm_checkpoint
    model = gemma3n.load(path)
    with BackgroundServer(create_app(model)) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120)
        yield model, client, client.models.list().data[0].id


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_media_part_matches_the_python_api(served, kind):
    model, client, model_id = served
    if kind == "image":
        part = {"type": "image_url", "image_url": {"url": _png()}}
        ours = {"type": "image", "image": base64.b64decode(_png().split(",", 1)[1])}
    else:
        part = {"type": "input_audio", "input_audio": {"data": _wav(), "format": "wav"}}
        ours = {"type": "audio", "audio": io.BytesIO(base64.b64decode(_wav())).getvalue()}
    text = {"type": "text", "text": "Describe."}
    r = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": [part, text]}], temperature=0, max_tokens=5
    )
    direct = model.generate(messages=[{"role": "user", "content": [ours, text]}], temperature=0, max_tokens=5)
    assert r.choices[0].message.content == direct.text
    assert r.usage.prompt_tokens == direct.prompt_tokens > 16
