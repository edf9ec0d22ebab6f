"""Speculative decoding (gemma3n/speculative.py): the same tokens as decoding without a draft at
temperature 0, for every declared size and prompt lookup, across sliding windows, KV sharing,
quantized weights, the prompt cache, stop strings, streaming and images; the target's exact
distribution when sampling (the acceptance rule on synthetic distributions, then end to end on
the embedded model against the exact joint distribution of its first tokens); clear errors."""

from __future__ import annotations

import pytest
import torch

import gemma3n
from gemma3n.drafts import NgramDrafter, draft_prompt_cache
from gemma3n.errors import InputError
from gemma3n.generate import SamplingParams, sampling_distribution
from gemma3n.speculative import MAX_K, KChooser, accept

# A held-out-style KJV passage (Exodus 3), longer than the sliding window (64 tokens).
PASSAGE = (
    "Now Moses kept the flock of Jethro his father in law, the priest of Midian: and he led the flock to "
    "the backside of the desert, and came to the mountain of God, even to Horeb. And the angel of the LORD "
    "appeared unto him in a flame of fire out of the midst of a bush: and he looked, and, behold, the bush "
    "burned with fire, and the bush was not consumed."
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return gemma3n.load()


@pytest.fixture(scope="module")
def passage(model):
    ids = model.tokenizer.encode(PASSAGE)
    assert len(ids) > model.config.text.sliding_window + 8
    return ids


def _greedy(model, ids, **kw):
    return model.generate(ids, max_tokens=kw.pop("max_tokens", 96), temperature=0, **kw)


# --------------------------------------------------------------------------------- temperature 0


@pytest.mark.parametrize(
    "draft,k",
    [("E2B-like", None), ("E2B-like", MAX_K), ("skip-5-9", 3), ("half-ffn", 5), ("half-ffn-5-14", 1), ("ngram", 4)],
)
def test_greedy_tokens_are_identical_to_no_draft(model, passage, draft, k):
    """Past the sliding window, with rejections rolling the caches back (also the sliding layers')."""
    base = _greedy(model, passage)
    result = _greedy(model, passage, draft=draft, draft_k=k)
    assert result.token_ids == base.token_ids and result.text == base.text
    stats = result.stats
    assert stats["draft"] == draft and stats["generated_tokens"] == len(base.token_ids) + (base.finish_reason == "stop")
    if k is not None:  # a fixed k drafts every round
        assert stats["verifications"] > 0 and stats["draft_tokens"] > 0
        assert 0 <= stats["acceptance_rate"] <= 1
        assert stats["tokens_per_verification"] == pytest.approx(
            (stats["accepted_tokens"] + stats["verifications"]) / stats["verifications"]
        )


def test_ngram_drafts_what_the_text_repeats(model):
    """Prompt lookup covers the reply too: the tiny model's greedy text repeats its own phrases
    (it is too small to copy a passage from its prompt), and those drafts are kept."""
    ids = model.tokenizer.encode("And the LORD said unto Moses")
    base = _greedy(model, ids, max_tokens=120)
    result = _greedy(model, ids, max_tokens=120, draft="ngram", draft_k=MAX_K)
    assert result.token_ids == base.token_ids
    assert result.stats["acceptance_rate"] > 0.4 and result.stats["tokens_per_verification"] > 3


def test_repetition_penalty_sees_the_drafted_history(model, passage):
    """The penalty at each verified position counts the drafted tokens before it."""
    base = _greedy(model, passage, repetition_penalty=1.5, max_tokens=64)
    for draft in ("E2B-like", "ngram"):
        result = _greedy(model, passage, repetition_penalty=1.5, max_tokens=64, draft=draft, draft_k=MAX_K)
        assert result.token_ids == base.token_ids


@pytest.mark.filterwarnings("ignore:.*kept in high precision")
def test_quantized_target_and_a_quantized_draft_model(model, passage):
    q8 = gemma3n.load(quantize="int8")
    base = _greedy(q8, passage, max_tokens=64)
    assert _greedy(q8, passage, max_tokens=64, draft="E2B-like", draft_k=4).token_ids == base.token_ids
    # an int4 copy of the weights drafts for the unquantized model
    q4 = gemma3n.load(quantize="int4")
    full = _greedy(model, passage, max_tokens=64)
    result = _greedy(model, passage, max_tokens=64, draft="E2B-like", draft_model=q4, draft_k=4)
    assert result.token_ids == full.token_ids
    assert result.stats["draft"] == f"{q4.name}:E2B-like" and result.stats["acceptance_rate"] > 0.3


def test_stop_strings_streaming_and_n(model, passage):
    base = list(model.stream(passage, max_tokens=80, temperature=0, stop=" LORD"))
    pieces = list(model.stream(passage, max_tokens=80, temperature=0, stop=" LORD", draft="E2B-like", draft_k=6))
    assert "".join(map(str, pieces)) == "".join(map(str, base)) and pieces[-1].finish_reason == base[-1].finish_reason
    assert pieces[-1].stats["verifications"] > 0
    results = model.generate(passage, max_tokens=24, temperature=0, n=2, draft="ngram", draft_k=3)
    assert [r.token_ids for r in results] == [_greedy(model, passage, max_tokens=24).token_ids] * 2


def test_logprobs_come_from_the_target(model, passage):
    base = model.generate(passage, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2)
    result = model.generate(passage, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2, draft="E2B-like")
    assert [e.token_id for e in result.logprobs] == base.token_ids == result.token_ids
    for ours, ref in zip(result.logprobs, base.logprobs):
        assert ours.logprob == pytest.approx(ref.logprob, abs=1e-3)
        assert [t.token_id for t in ours.top] == [t.token_id for t in ref.top]


def test_prompt_cache_keeps_target_and_draft_caches(model, passage):
    conversation = gemma3n.PromptCache()
    first = _greedy(model, passage, max_tokens=16, draft="E2B-like", draft_k=3, prompt_cache=conversation)
    drafts = draft_prompt_cache(conversation, model.decoder)
    assert len(conversation) == 1 and len(drafts) == 1  # neither evicts the other
    follow = passage + first.token_ids + model.tokenizer.encode(" And Moses said")
    second = _greedy(model, follow, max_tokens=32, draft="E2B-like", draft_k=3, prompt_cache=conversation)
    assert second.stats["cached_prompt_tokens"] >= len(passage)
    assert second.token_ids == _greedy(model, follow, max_tokens=32).token_ids


def test_k_adapts_to_costs_and_acceptance():
    """Adaptive k: plain decoding where checking costs more than it could ever gain, probes now and
    then where a better acceptance would pay, drafts where it pays; a fixed k stays within the limit."""
    hopeless = KChooser()  # a tiny model's fused step: checking 5 rows costs 6 steps
    assert hopeless.choose(10) == KChooser.START_K
    hopeless.observe_round(4, 4, draft_s=4 * 0.7, verify_s=6.0)
    assert hopeless.choose(10) == 0  # a plain step is measured next
    hopeless.observe_plain(1.0)
    assert not any(hopeless.choose(10) for _ in range(100))
    marginal = KChooser()  # cheap checks, but little was accepted
    marginal.observe_round(4, 0, draft_s=0.4, verify_s=2.5)
    marginal.observe_plain(1.0)
    ks = [marginal.choose(10) for _ in range(40)]
    assert ks.count(0) == 39 and ks[KChooser.PROBE_GAP - 1] > 0
    cheap = KChooser()
    for _ in range(5):
        cheap.observe_round(MAX_K, MAX_K, draft_s=0.0, verify_s=1.1)  # a weight-bound model, prompt lookup
    cheap.observe_plain(1.0)
    assert cheap.choose(100) == MAX_K and cheap.choose(3) == 3
    assert KChooser(fixed=5).choose(2) == 2


def test_a_rejected_draft_never_rolls_back_past_the_sliding_margin():
    from gemma3n.cache import ROLLBACK

    assert MAX_K + 1 <= ROLLBACK


def test_ngram_drafter_takes_the_latest_match():
    history = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    drafter = NgramDrafter(max_n=3, min_n=2)
    assert drafter.propose(history, 3) == ([7, 8, 6], [7, 8, 6])  # "2 3" was last followed by 7
    assert drafter.propose(history + [4], 2)[0] == [5, 9]  # the longer match "2 3 4" wins over "3 4"
    assert NgramDrafter().propose(history[:-1] + [1, 2, 3], 2)[0] == [4, 5]  # as does "1 2 3"
    assert NgramDrafter().propose([5, 6], 4) == ([], [])


# --------------------------------------------------------------------------------- sampling: exact


def _chi_square_pvalue(counts: dict, probs: dict, n: int, min_expected: float = 5.0) -> float:
    """Pearson's chi-square of observed counts against probabilities; outcomes expected fewer
    than `min_expected` times are pooled into one cell (the approximation needs it)."""
    observed, expected = [], []
    pooled_o, pooled_e = 0.0, 0.0
    for key in set(probs) | set(counts):
        e, o = n * probs.get(key, 0.0), counts.get(key, 0)
        if e < min_expected:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
        else:
            observed.append(o)
            expected.append(e)
    if pooled_e > 0:
        observed.append(pooled_o)
        expected.append(pooled_e)
    elif pooled_o:
        return 0.0  # outcomes the distribution cannot produce
    dof = len(observed) - 1
    if dof == 0:  # one possible outcome, and only it was observed
        return 1.0
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    stat = float(((o - e) ** 2 / e).sum())
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def _dist(p: torch.Tensor | int, v: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(p), v).double() if isinstance(p, int) else p.double()


def _accept_samples(p, q, draws: int, seed: int, rule=accept) -> dict:
    """Counts of the first token the acceptance rule emits, for a draft drawn from q."""
    gen = torch.Generator().manual_seed(seed)
    counts: dict = {}
    for _ in range(draws):
        token = q if isinstance(q, int) else int(torch.multinomial(q, 1, generator=gen))
        kept, extra = rule([token], [q], lambda i: p if i == 0 else 0, gen)
        first = token if kept else extra
        counts[first] = counts.get(first, 0) + 1
    return counts


P = torch.tensor([0.40, 0.25, 0.20, 0.15, 0.0, 0.0])  # zeros: what top-k/top-p/min-p removed
Q = torch.tensor([0.10, 0.40, 0.0, 0.20, 0.30, 0.0])  # puts mass where p has none


@pytest.mark.parametrize("p,q", [(P, Q), (P, 1), (P, 4), (2, Q), (Q.flip(0) / Q.sum(), P)], ids=str)
def test_acceptance_rule_emits_the_target_distribution(p, q):
    draws = 20000
    counts = _accept_samples(p, q, draws, seed=1)
    target = {i: float(x) for i, x in enumerate(_dist(p, 6)) if x > 0}
    assert _chi_square_pvalue(counts, target, draws) > 1e-3


def test_the_chi_square_check_catches_a_wrong_rule():
    """The same check on rules with a classic bug fails: accepting every draft (the draft's
    distribution) or resampling rejections from p instead of max(0, p - q) (too much mass where
    q already put it)."""

    def always(tokens, drafts, target, gen):
        return len(tokens), 0

    def plain_resample(tokens, drafts, target, gen):
        p, q = target(0), drafts[0]
        if float(torch.rand((), generator=gen)) * float(q[tokens[0]]) < float(p[tokens[0]]):
            return 1, 0
        return 0, int(torch.multinomial(p, 1, generator=gen))

    target = {i: float(x) for i, x in enumerate(P) if x > 0}
    for rule in (always, plain_resample):
        assert _chi_square_pvalue(_accept_samples(P, Q, 20000, seed=1, rule=rule), target, 20000) < 1e-6


# End to end: the joint distribution of the first three generated tokens under sampling flags that
# exercise every transform, computed exactly from the model's logits, against seeded samples.
SAMPLING = dict(temperature=1.0, top_k=4, top_p=0.95, min_p=0.02, repetition_penalty=1.3)
SAMPLES = 256  # per case: ~16 s for a MatFormer draft on one core


def _exact_joint(model, ids: list[int], depth: int, sampling: dict) -> dict:
    """{first tokens (a stop token ends a sequence as "stop"): probability}."""
    params, stops = SamplingParams(**sampling), model.stop_ids()
    live, out = {(): 1.0}, {}
    for _ in range(depth):
        grown = {}
        for seq, pr in live.items():
            logits = model.logits(torch.tensor([ids + list(seq)]))[0, -1]
            dist = _dist(sampling_distribution(logits, ids + list(seq), params), logits.numel())
            for t in dist.nonzero().flatten().tolist():
                stopped = t in stops
                (out if stopped else grown)[seq + (("stop",) if stopped else (t,))] = pr * float(dist[t])
        live = grown
    return out | live


def _sampled_joint(model, ids: list[int], depth: int, sampling: dict, **kw) -> tuple[dict, dict]:
    """(counts of the first tokens over SAMPLES seeded generations, their summed draft stats)."""
    counts: dict = {}
    drafts = {"draft_tokens": 0, "accepted_tokens": 0}
    for call in range(SAMPLES // 16):
        for r in model.generate(ids, max_tokens=depth + 1, n=16, seed=1000 * call, **sampling, **kw):
            key = tuple(r.token_ids[:depth]) + (("stop",) if len(r.token_ids) < depth else ())
            counts[key] = counts.get(key, 0) + 1
            for name in drafts:
                drafts[name] += r.stats.get(name, 0)
    return counts, drafts


@pytest.mark.parametrize(
    "prompt,draft,penalty",
    [
        # prompts where the embedded model's drafts are both kept and rejected often (the
        # assertion below): they depend on its training, so they change with the model
        ("For the LORD", "E2B-like", 1.3),  # drafts from a distribution q != p
        # point-mass drafts; a strong penalty would reject nearly every repeat prompt lookup drafts
        ("The sons of Aaron, and the sons of Levi, and the sons of Aaron, and the sons of", "ngram", 1.05),
    ],
)
def test_sampling_keeps_the_target_distribution(model, prompt, draft, penalty):
    """Four tokens generated with k = 2 drafts: the first three cover an accepted draft, a
    rejection resampled from the residual, the bonus token and the penalty over drafted history."""
    ids, sampling = model.tokenizer.encode(prompt), dict(SAMPLING, repetition_penalty=penalty)
    exact = _exact_joint(model, ids, 3, sampling)
    sampled, drafts = _sampled_joint(model, ids, 3, sampling, draft=draft, draft_k=2)
    assert _chi_square_pvalue(sampled, exact, SAMPLES) > 1e-3
    # both outcomes of a check happened often: kept drafts and rejected ones
    assert drafts["accepted_tokens"] > SAMPLES / 4 and drafts["draft_tokens"] - drafts["accepted_tokens"] > SAMPLES / 4
    if draft != "ngram":
        return
    # the check has the power to see the difference between the target and a smaller size (the
    # sizes closest to the full model depend on the training: the first that differs here is enough)
    assert any(
        _chi_square_pvalue(_sampled_joint(model, ids, 3, sampling, size=size)[0], exact, SAMPLES) < 1e-3
        for size in ("skip-5-9", "E2B-like")
    )


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(draft="E9B"), "E9B"),
        (dict(draft=None, size="E2B-like", draft_k=3), "draft_k"),
        (dict(draft="half-ffn", size="E2B-like"), "not smaller"),
        (dict(draft="E2B-like", size="E2B-like"), "not smaller"),
        (dict(draft={"skip": []}), "not smaller"),
        (dict(draft="E2B-like", draft_k=MAX_K + 1), "draft_k"),
        (dict(draft="E2B-like", draft_k=0), "draft_k"),
        (dict(draft="E2B-like", draft_k=True), "draft_k"),
        (dict(draft="ngram", response_format={"type": "json_object"}), "response_format"),
    ],
)
def test_bad_drafts_are_clear_errors(model, kw, message):
    with pytest.raises(InputError, match=message):
        model.generate("In the beginning", max_tokens=4, **kw)


def test_a_draft_model_must_share_the_vocabulary(model, hf_text):
    other = gemma3n.load(hf_text[1])
    with pytest.raises(InputError, match="vocabulary"):
        model.generate("In the beginning", max_tokens=4, draft_model=other)
    with pytest.raises(InputError, match="no draft_model"):
        model.generate("In the beginning", max_tokens=4, draft="ngram", draft_model=model)


# --------------------------------------------------------------------------------- images


def test_an_image_prompt_reaches_the_draft(mm_checkpoint):
    """A draft model given the image's soft tokens agrees with the target (the same weights), so
    nearly every draft is kept; one that missed them would not be."""
    pytest.importorskip("timm")
    from PIL import Image

    _, _, path = mm_checkpoint
    target, same = gemma3n.load(path), gemma3n.load(path)
    pixels = (torch.arange(64 * 64 * 3) % 251).to(torch.uint8).view(64, 64, 3).numpy()
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)}, "Describe"]}]
    messages[0]["content"][1] = {"type": "text", "text": "Describe"}
    base = target.generate(messages=messages, temperature=0, max_tokens=12)
    result = target.generate(messages=messages, temperature=0, max_tokens=12, draft_model=same, draft_k=3)
    assert result.token_ids == base.token_ids
    assert result.stats["acceptance_rate"] > 0.8


# --------------------------------------------------------------------------------- command line


def test_cli_draft_flags(capsys):
    from gemma3n.cli import main

    args = ["generate", "--raw", "--prompt", "Blessed are the", "--max-tokens", "24", "--temp", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--draft", "E2B-like", "--draft-k", "3", "--verbose"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "draft E2B-like:" in out.err and "tokens per verification" in out.err
    assert main([*args, "--draft", "ngram", "--draft-quantize", "int8"]) == 2
    assert main([*args, "--draft-k", "3"]) == 2
    assert main([*args, "--draft", "E2B-like", "--draft-k", "16"]) == 2
    assert "draft_k" in capsys.readouterr().err


# --------------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def drafting_server(model):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from gemma3n.server import BackgroundServer, create_app

    calls: list[dict] = []
    stream = model.stream

    def spy(*args, **kw):  # what reached the model
        calls.append(kw)
        return stream(*args, **kw)

    model.stream = spy
    try:
        with BackgroundServer(create_app(model, draft="E2B-like", draft_k=3)) as srv:
            yield srv, calls
    finally:
        del model.stream


def _complete(server, **body):
    import httpx

    return httpx.post(f"{server.base_url}/completions", json={"prompt": "Blessed are the", **body}, timeout=60)


def test_server_default_draft_and_per_request_field(drafting_server, model):
    server, calls = drafting_server
    greedy = dict(temperature=0, max_tokens=16)
    plain = model.generate("Blessed are the", **greedy).text
    reply = _complete(server, **greedy)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == plain
    assert calls[-1]["draft"] == "E2B-like" and calls[-1]["draft_k"] == 3  # the server's --draft
    assert _complete(server, draft="ngram", draft_k=2, **greedy).json()["choices"][0]["text"] == plain
    assert calls[-1]["draft"] == "ngram" and calls[-1]["draft_k"] == 2
    before = len(calls)
    reply = _complete(server, draft="none", **greedy)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == plain
    assert len(calls) == before or "draft" not in calls[-1]  # (plain requests decode in the batch)
    # where the server's draft does not apply, requests run without it: its own size, a grammar
    assert _complete(server, model="gemma3n-E2B-like", **greedy).status_code == 200
    assert "draft" not in calls[-1] and calls[-1]["size"] == "E2B-like"
    assert _complete(server, response_format={"type": "json_object"}, **greedy).status_code == 200
    assert "draft" not in calls[-1]


def test_server_draft_errors(drafting_server, model):
    from gemma3n.server import create_app

    server, _ = drafting_server
    bad = _complete(server, draft="E9B", max_tokens=4)
    assert bad.status_code == 400 and "E9B" in bad.json()["error"]["message"]
    assert _complete(server, draft="E2B-like", draft_k=MAX_K + 1, max_tokens=4).status_code == 400
    assert _complete(server, draft=3, max_tokens=4).status_code == 400
    with pytest.raises(InputError, match="not smaller"):
        create_app(model, draft={"skip": []})
