"""The towers' training recipe (tools/pretrain_tiny_towers.py, tools/train_tiny_media.py):
SpecAugment's masks must not leave the subsampler an all-zero first step, whose gradient the
conformer's RMSNorms blow up; the whitened token metric keeps a token's own embedding its best
match; a decoder kept alone in bf16 resumes whole; runs' decoders average only over the same towers;
spoken CTC labels hold only what can be heard."""

from __future__ import annotations

import random
import shutil
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
import tiny_media_data  # noqa: E402
from average_tiny_media import average  # noqa: E402
from pretrain_tiny_towers import TokenHead, grow_block, resume, save, spec_augment  # noqa: E402
from tiny_media_data import spoken_text, spoken_transcripts, word_casing  # noqa: E402
from train_tiny_media import (  # noqa: E402
    AUDIO_CONFIG,
    TOWER_SHAPE,
    answer_loss,
    chat_turns,
    decoder_path,
    init_audio_tower,
    load_decoder,
    load_soft_cache,
    load_text_decoder,
    noisy_history,
    plans,
    save_soft_cache,
    save_text_decoder,
    soft_cache_key,
    token_keys,
    token_logits,
    tower_shape,
    whitening,
)

TINY = Path(__file__).resolve().parents[1] / "gemma3n" / "data" / "tiny"

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


def test_whitened_metric_spreads_the_tokens_and_keeps_each_its_own_best():
    torch.manual_seed(0)
    common = torch.randn(16)
    table = 4 * common + 0.3 * torch.randn(200, 16)  # one shared direction, as the tiny decoder's embeddings
    metric = whitening(table)
    keys = token_keys(table, torch.randn(16))

    def nearest_other(m: torch.Tensor | None) -> float:
        cos = token_logits(table, keys, torch.tensor(1.0), m)[:, 1:]
        own = cos.diagonal().clone()
        cos.fill_diagonal_(-2)
        assert torch.allclose(own, torch.ones(200), atol=1e-4)  # a token's embedding scores its own cosine 1
        return cos.max(1).values.median().item()

    plain, whitened = nearest_other(None), nearest_other(metric)
    assert plain > 0.95 and whitened < 0.8, (plain, whitened)
    # the argmax of a soft token along a token's embedding (any length) is that token
    logits = token_logits(3.0 * table[:20], keys, torch.tensor(10.0), metric)
    assert torch.equal(logits.argmax(-1), torch.arange(20) + 1)


def test_token_head_resumes_blank_and_scale_but_rebuilds_its_metric(tmp_path):
    from safetensors.torch import save_file

    table = torch.randn(50, 16) + 3.0
    old = TokenHead(table)  # a cosine head's file: blank and scale, no metric
    with torch.no_grad():
        old.scale.fill_(17.0)
    save_file({"head." + k: v for k, v in old.state_dict().items()}, str(tmp_path / "tower.safetensors"))
    new = TokenHead(table + 1.0, "whitened")
    resume(tmp_path / "tower.safetensors", {"head.": new})
    assert new.scale.item() == 17.0 and torch.equal(new.blank, old.blank)
    assert torch.allclose(new.metric, whitening(table + 1.0))


def test_a_tower_resumed_against_another_decoder_says_so(tmp_path, capsys):
    """A tower's words are scored against the --decoder's embeddings, and the package's decoder
    changes as rounds ship: resuming against another decoder than the file's says so."""
    from safetensors.torch import save_file

    table = torch.randn(50, 16) + 3.0
    save_file(
        {"head." + k: v for k, v in TokenHead(table, "whitened").state_dict().items()}, str(tmp_path / "t.safetensors")
    )
    resume(tmp_path / "t.safetensors", {"head.": TokenHead(table, "whitened")})
    assert "retargeted" not in capsys.readouterr().out
    resume(tmp_path / "t.safetensors", {"head.": TokenHead(table + 0.5 * torch.randn(50, 16), "whitened")})
    assert "trained against another --decoder" in capsys.readouterr().out


def test_a_kept_soft_cache_loads_only_for_the_inputs_it_was_made_from(tmp_path, capsys):
    """--cache-file: a second run on the same tower and checkpoint files, clips, count, transcripts
    and so on loads the cache; a changed tower file, checkpoint (its vision tower reads the scenes)
    or any other input builds a new one."""
    from argparse import Namespace

    tower = tmp_path / "tower.safetensors"
    tower.write_bytes(b"tower one")
    init = tmp_path / "init"
    init.mkdir()
    (init / "model.safetensors").write_bytes(b"vision one")
    args = Namespace(
        init_audio=tower,
        init=init,
        speech=tmp_path,
        soft_cache=3,
        transcripts="spoken",
        bare_edges=0.0,
        res_weights="256:0.5,768:0.5",
        image_batch=8,
    )
    cache = (torch.randn(3, 4, 2), [[1, 2], [3], [4, 5, 6]], [(256, [(None, "scene")], torch.randn(1, 2))])
    path = tmp_path / "cache.pt"
    save_soft_cache(path, soft_cache_key(args), cache)
    assert not (tmp_path / "cache.pt.partial").exists()
    speech, answers, images = load_soft_cache(path, soft_cache_key(args))
    assert torch.equal(speech, cache[0]) and answers == cache[1] and images[0][1] == cache[2][0][1]
    tower.write_bytes(b"tower two")
    assert load_soft_cache(path, soft_cache_key(args)) is None
    assert "made from other inputs" in capsys.readouterr().out
    tower.write_bytes(b"tower one")
    assert load_soft_cache(path, soft_cache_key(args)) is not None
    (init / "model.safetensors").write_bytes(b"vision two")
    assert load_soft_cache(path, soft_cache_key(args)) is None
    (init / "model.safetensors").write_bytes(b"vision one")
    for changed in ({"soft_cache": 4}, {"bare_edges": 0.3}, {"image_batch": 4}):
        assert load_soft_cache(path, soft_cache_key(Namespace(**{**vars(args), **changed}))) is None


def test_decoder_kept_in_bf16_resumes_every_weight(tmp_path):
    ckpt = tmp_path / "joint"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to(TINY / "model.safetensors")
    save_text_decoder(ckpt)
    assert (
        decoder_path(ckpt).exists()
        and decoder_path(ckpt).stat().st_size < 0.6 * (TINY / "model.safetensors").stat().st_size
    )
    dec = load_decoder(TINY)[0]
    want = {k: v.to(torch.bfloat16).float() for k, v in dec.state_dict().items()}
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
    from safetensors.torch import load_file

    load_text_decoder(dec, load_file(decoder_path(ckpt)))
    got = dec.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(SystemExit, match="no model.language_model"):
        load_text_decoder(dec, {"model.audio_tower.x": torch.zeros(1)})


def test_averaged_runs_mean_their_decoders_and_refuse_other_towers(tmp_path):
    from safetensors.torch import load_file, save_file

    shipped = load_file(TINY / "model.safetensors")
    dec = sorted(k for k in shipped if k.startswith("model.language_model.") and shipped[k].dtype == torch.float32)
    other = next(k for k in shipped if k.startswith("model.audio_tower."))
    runs = []
    for n, shift in enumerate((1.0, 3.0)):  # two runs: the same towers, other decoders
        run = tmp_path / f"run{n}"
        shutil.copytree(TINY, run)
        save_file({**shipped, dec[0]: shipped[dec[0]] + shift}, run / "model.safetensors")
        runs.append(run)
    out = average(runs, tmp_path / "mean")
    got = load_file(out / "model.safetensors")
    assert torch.allclose(got[dec[0]], shipped[dec[0]] + 2.0)
    assert all(torch.equal(got[k], shipped[k]) for k in shipped if k != dec[0])
    assert (out / "config.json").read_text() == (TINY / "config.json").read_text()
    kept = load_file(decoder_path(out))  # the decoder alone in bf16, as a training run keeps it
    assert torch.equal(kept[dec[0]], got[dec[0]].to(torch.bfloat16))
    save_file({**shipped, other: shipped[other] + 1.0}, runs[1] / "model.safetensors")
    with pytest.raises(SystemExit, match="only the text decoders may"):
        average(runs, tmp_path / "refused")
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.partial").exists()


def test_noisy_history_lies_only_in_what_the_decoder_reads():
    eot = 106
    answers = [[5, 6, 7, 8] * 50 + [eot], [9] * 300 + [eot], [eot]]
    pool = [4000, 4001, 4002]
    noisy = noisy_history(answers, 0.3, pool, eot, random.Random(0))
    assert [len(h) for h in noisy] == [len(a) for a in answers] and all(h[-1] == eot for h in noisy)
    changed = [(t, h) for a, n in zip(answers, noisy) for t, h in zip(a, n) if t != h]
    assert all(h in pool for _, h in changed) and 0.25 < len(changed) / 500 < 0.35
    assert noisy_history(answers, 0.0, pool, eot, random.Random(0)) == answers

    # the decoder reads the noisy history, and is scored on the true answer
    dec, cfg, _ = load_decoder(TINY)
    dec.eval()
    plan = plans(cfg)["full"]
    prompts, short = [[2, 105, 2364, 107]] * 2, [a[-9:] for a in answers[:2]]
    empty = torch.zeros(2, 0, cfg.hidden_size)
    with torch.no_grad():
        clean, _, tgt = answer_loss(dec, plan, prompts, short, empty, -1)
        same, _, _ = answer_loss(dec, plan, prompts, short, empty, -1, [list(a) for a in short])
        lied, _, tgt_lied = answer_loss(dec, plan, prompts, short, empty, -1, [[4000] * 8 + [eot]] * 2)
    assert torch.equal(clean, same) and torch.equal(tgt, tgt_lied) and not torch.isclose(clean, lied)
    with pytest.raises(ValueError, match="history of 2 tokens"):
        answer_loss(dec, plan, prompts, short, empty, -1, [[1, 2]] * 2)


def test_chat_turns_end_at_a_verse_end_with_chat_ends():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    eot, newline = tok.token_to_id("<end_of_turn>"), tok.encode("\n", add_special_tokens=False).ids[0]
    verses = "\n".join(["And God saw the light, that it was good: and God divided the light from the darkness."] * 40)
    stream = torch.tensor(tok.encode(verses, add_special_tokens=False).ids)
    prompt = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    _, open_replies = chat_turns(tok, prompt, stream, 16, random.Random(0))
    assert all(len(r) == 48 and eot not in r for r in open_replies)  # the runs before: no end of turn
    _, replies = chat_turns(tok, prompt, stream, 16, random.Random(0), eot)
    for reply, whole in zip(replies, open_replies):
        k = len(reply) - 1  # the reply is the continuation up to its first verse end after 8 tokens
        assert reply[-1] == eot and reply[:k] == whole[:k] and whole[k] == newline and k >= 8
        assert newline not in reply[8:k]


def test_spoken_labels_hold_one_spelling_a_word_and_no_punctuation():
    from tokenizers import Tokenizer

    lines = [
        "And the LORD said unto Moses, Go in unto Pharaoh: and the LORD God spake.",
        "For the lord of the house said, The LORD is good, and for ever.",
    ]
    casing = word_casing(lines)
    # inside a sentence "the" and "LORD" win; "And" / "For" at sentence starts do not count
    assert (casing["the"], casing["lord"], casing["and"], casing["for"]) == ("the", "LORD", "and", "for")
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))

    def ids(text: str) -> list[int]:
        return tok.encode(spoken_text(text, casing), add_special_tokens=False).ids

    written = ids("For the LORD is good; and Moses said, Go.")
    assert written == ids("for the Lord is good and moses said go")
    assert written[:2] == ids("for the") == ids("For, the")  # a first word is spelt as any other
    assert not any(tok.id_to_token(i).lstrip("\u0120") in {",", ".", ";", ":"} for i in written)
    assert spoken_text("Herod's steward, loving-kindness", casing) == " herod's steward loving kindness"


def test_spoken_transcripts_take_the_training_verses_casing(monkeypatch):
    """The tower's spoken labels and the decoder's spoken transcripts (--transcripts spoken) come from
    one function, spelt as the training verses spell each word, never the held-out ones."""
    asked = []

    def verses(held_out: bool) -> list[str]:
        asked.append(held_out)
        return ["Then the LORD spake unto Moses, and Moses said, the LORD is good."]

    monkeypatch.setattr(tiny_media_data, "verses", verses)
    assert spoken_transcripts(["The lord SPAKE; And moses went."]) == [" the LORD spake and Moses went"]
    assert asked == [False]


def test_bare_edges_send_clips_trimmed_and_leave_the_old_stream_alone():
    """augment(bare=1) keeps no silence around the words; bare=0 draws exactly what earlier runs drew."""
    import numpy as np

    wave = np.sin(np.arange(16000, dtype=np.float32) / 7)
    lengths = {len(tiny_media_data.augment(wave, np.random.default_rng(s), bare=1.0)) for s in range(20)}
    assert lengths == {len(wave)}
    padded = [len(tiny_media_data.augment(wave, np.random.default_rng(s))) for s in range(20)]
    assert min(padded) >= len(wave) and max(padded) > len(wave) + 1600
    for s in range(5):
        a = tiny_media_data.augment(wave, np.random.default_rng(s))
        assert np.array_equal(a, tiny_media_data.augment(wave, np.random.default_rng(s), bare=0.0))
    some = [len(tiny_media_data.augment(wave, np.random.default_rng(s), bare=0.5)) == len(wave) for s in range(200)]
    assert 20 < sum(some) < 100  # both edges bare a quarter of the time


def test_a_larger_training_set_only_adds_clips(monkeypatch):
    """--train-clips past the first draw adds clips: the held-out verses and the first clips' texts and
    voices stay as they were, so every earlier figure stays comparable."""
    pool = {
        held: [f"{'held' if held else 'train'} verse {i} " + "word " * 10 for i in range(40)] for held in (False, True)
    }
    pieces = [f"piece {i} " + "word " * 8 for i in range(20)]
    monkeypatch.setattr(tiny_media_data, "utterances", lambda held_out, **_: list(pool[held_out]))
    monkeypatch.setattr(tiny_media_data, "verse_pieces", lambda held_out, **_: [] if held_out else list(pieces))
    monkeypatch.setattr(tiny_media_data, "FIRST_DRAW", 12)
    plans = [tiny_media_data.plan_clips(0, n, 6) for n in (5, 12, 30, 40, 52, 99)]
    for texts, settings, held in plans:
        assert held == plans[0][2] and len(held) == 6 and set(held) <= set(pool[True])
        assert len(texts) == len(settings) and len(set(texts)) == len(texts)
        assert texts[:5] == plans[0][0] and settings[:5] == plans[0][1]
    assert [len(t) for t, _, _ in plans] == [5, 12, 30, 40, 52, 60]
    for shorter, longer in zip(plans[1:], plans[2:]):
        n = len(shorter[0])
        assert shorter[0] == longer[0][:n] and shorter[1] == longer[1][:n]
    assert set(plans[3][0]) == set(pool[False])  # every single verse before any piece
    assert set(plans[5][0][40:]) == set(pieces)
    assert tiny_media_data.plan_clips(1, 30, 6) != plans[2]  # the seed still matters


def test_verse_pieces_cut_long_verses_at_their_punctuation(monkeypatch):
    short = "And God saw the light, that it was good."
    long = (
        "And the LORD spake unto Moses, saying, Speak unto the children of Israel; that they bring me an offering: "
        "of every man that giveth it willingly with his heart ye shall take my offering, and this is the offering "
        "which ye shall take of them; gold, and silver, and brass."
    )
    monkeypatch.setattr(tiny_media_data, "verses", lambda held_out: [short, long])
    pieces = tiny_media_data.verse_pieces(held_out=False, min_words=6, max_words=24)
    assert pieces == [
        "And the LORD spake unto Moses, saying, Speak unto the children of Israel; that they bring me an offering",
        "of every man that giveth it willingly with his heart ye shall take my offering",
        "and this is the offering which ye shall take of them; gold, and silver, and brass.",
    ]
    assert all(6 <= len(p.split()) <= 24 for p in pieces)
    # nothing lost but the comma or colon that ended a piece
    assert " ".join(pieces) == long.replace("offering:", "offering").replace("offering,", "offering")
    # a clause past max_words is dropped (the 15- and 11-word ones), and so is a run left too short
    # ("gold, and silver, and brass.", and the short verse's two halves once it is cut at 8 words)
    assert tiny_media_data.verse_pieces(held_out=False, min_words=6, max_words=8) == [
        "And the LORD spake unto Moses, saying",
        "Speak unto the children of Israel",
        "that they bring me an offering",
    ]


def test_a_tower_file_carries_its_look_ahead_and_depth(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setitem(AUDIO_CONFIG, "conf_attention_context_right", 12)
    monkeypatch.setitem(AUDIO_CONFIG, "conf_num_hidden_layers", 4)
    tower = init_audio_tower(seed=0)
    grow_block(tower)
    save(tmp_path / "ahead.safetensors", {"model.audio_tower.": tower})
    assert tower_shape(tmp_path / "ahead.safetensors") == {
        "conf_attention_context_right": 12,
        "conf_num_hidden_layers": 5,
    }
    save_file({"x": torch.zeros(1)}, str(tmp_path / "old.safetensors"))  # earlier rounds' files
    assert tower_shape(tmp_path / "old.safetensors") == TOWER_SHAPE


def test_a_grown_block_starts_as_the_identity(monkeypatch):
    monkeypatch.setitem(AUDIO_CONFIG, "conf_num_hidden_layers", 2)
    tower = init_audio_tower(seed=0).eval()
    with torch.no_grad():
        tower.conformer[-1].norm.weight.uniform_(0.5, 3.0)  # a trained closing norm's scale
        feats, mask = torch.randn(2, 200, 128), torch.ones(2, 200, dtype=torch.bool)
        before = tower(feats, mask)[0]
        grow_block(tower)
        after = tower(feats, mask)[0]
    assert len(tower.conformer) == 3 and tower.config.conf_num_hidden_layers == 3
    # not exactly: the closing RMSNorm's divisor varies a little from step to step
    assert (after - before).norm() < 0.1 * before.norm()
    assert torch.nn.functional.cosine_similarity(after, before, dim=-1).min() > 0.99
    assert any(p.abs().sum() > 0 for p in tower.conformer[-1].attention.attn.parameters())  # not all zero


def test_pins_tool_sees_what_the_pinning_tests_see():
    """tools/pins_tiny_media.py (run on a candidate before shipping it) reads the tests' own pins:
    on the shipped model every one of them holds, with margins far above float noise."""
    from pins_tiny_media import pins

    report = pins(TINY, ["For the LORD"])
    assert report["sample"]["unchanged"] and report["GREEDY_8"]["unchanged"] and report["GREEDY_4_E2B"]["unchanged"]
    assert all(x["right"] for x in report["image"].values())
    assert report["CHAT_THAT_ENDS"]["ends"]
    margins = [x["margin"] for x in report["sample"]["lines"]] + [report["GREEDY_8"]["margin"]]
    margins += [report["GREEDY_4_E2B"]["margin"], report["CHAT_THAT_ENDS"]["margin"]]
    assert min(margins) > 1e-3
    spec = report["speculative"]["For the LORD"]
    assert min(spec["kept"], spec["rejected"]) > 64  # as test_sampling_keeps_the_target_distribution asks
