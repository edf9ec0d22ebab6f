"""The public API and CLI on the embedded default model: chat format, streaming, sampling."""

from __future__ import annotations

import shutil

import pytest

import gemma3n
from gemma3n.cli import main
from gemma3n.processing import GEMMA_TEMPLATE
from gemma3n.tokenizer import StreamingDetokenizer


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return gemma3n.load()


def test_default_model_is_the_shipped_one(model, tiny_model_dir):
    assert model.path == tiny_model_dir
    assert model.config.text.vocab_size == model.tokenizer.vocab_size
    assert model.config.eos_token_ids == [model.tokenizer.token_id("eos"), model.tokenizer.token_id("end_of_turn")]


def test_chat_template_matches_transformers(model, tmp_path):
    """Our built-in template rendered by our renderer == transformers' apply_chat_template."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(model.path / "tokenizer.json"), bos_token="<bos>")
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "  Hello  "}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Why?"},
    ]
    ref = hf_tok.apply_chat_template(chat, chat_template=GEMMA_TEMPLATE, tokenize=False, add_generation_prompt=True)
    ours = model.tokenizer.decode(model.processor.from_messages(chat).ids, skip_special_tokens=False)
    assert ours == ref
    assert ours == (
        "<bos><start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n<start_of_turn>model\nHi.<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
    )


def test_checkpoint_template_wins(tiny_model_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_model_dir, dst)
    (dst / "chat_template.jinja").write_text("{{ bos_token }}CUSTOM:{{ messages[0]['content'] }}")
    m = gemma3n.load(dst)
    ids = m.processor.from_messages([{"role": "user", "content": "x"}]).ids
    assert m.tokenizer.decode(ids, skip_special_tokens=False) == "<bos>CUSTOM:x"


def test_streaming_detokenizer_never_breaks_characters(model):
    text = "héllo wörld — 日本語 🙂 done."
    ids = model.tokenizer.encode(text)
    detok = StreamingDetokenizer(model.tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(map(str, pieces)) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # it really streamed


def test_stream_pieces_and_result_agree(model):
    kw = dict(max_tokens=12, seed=7, temperature=0.8)
    pieces = list(model.stream("The sky", **kw))
    result = model.generate("The sky", **kw)
    assert "".join(map(str, pieces)) == result.text
    assert all(p.finish_reason is None for p in pieces[:-1]) and pieces[-1].finish_reason == result.finish_reason
    assert sum(len(p.token_ids) for p in pieces) == len(result.token_ids)
    assert pieces[-1].stats["prompt_tokens"] == result.prompt_tokens > 0


def test_seed_determinism_and_greedy(model):
    a = model.generate("Once", max_tokens=16, seed=1, temperature=1.0)
    b = model.generate("Once", max_tokens=16, seed=1, temperature=1.0)
    c = model.generate("Once", max_tokens=16, seed=2, temperature=1.0)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = model.generate("Once", max_tokens=16, temperature=0)
    assert model.generate("Once", max_tokens=16, top_k=1, temperature=1.0, seed=3).token_ids == greedy.token_ids


def test_finish_reasons_and_stop_strings(model):
    r = model.generate("Once", max_tokens=20, temperature=0)
    assert r.finish_reason == "length" and len(r.token_ids) == 20
    full = r.text
    stop = full[5:8]
    cut = model.generate("Once", max_tokens=20, temperature=0, stop=[stop, "zzzz-never"])
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    streamed = "".join(map(str, model.stream("Once", max_tokens=20, temperature=0, stop=stop)))
    assert streamed == cut.text


def test_token_id_prompt_is_used_as_is(model):
    ids = model.tokenizer.encode("abc", add_special_tokens=True)
    assert (
        model.generate(ids, max_tokens=5, temperature=0).token_ids
        == model.generate("abc", max_tokens=5, temperature=0).token_ids
    )


def test_cli_generate_and_info(capsys):
    assert main(["generate", "--prompt", "hello", "--max-tokens", "8", "--seed", "0", "--verbose"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "generation: " in out.err and "tok/s" in out.err
    assert main(["info", "--placement"]) == 0
    info = capsys.readouterr().out
    assert "borrows K/V of layer 3" in info and "borrows K/V of layer 4" in info
    assert "per-layer embedding table" in info and "host, memory-mapped" in info


def test_cli_reads_prompt_from_stdin(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert main(["generate", "--prompt", "-", "--raw", "--max-tokens", "4", "--temp", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_cli_chat_keeps_history(monkeypatch, capsys):
    import io

    seen = []
    original = gemma3n.Model.stream

    def spy(self, *args, **kwargs):
        seen.append([m["role"] for m in kwargs["messages"]])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gemma3n.Model, "stream", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand again\n\n"))
    assert main(["chat", "--max-tokens", "3", "--temp", "0", "--system-prompt", "brief"]) == 0
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"]]
