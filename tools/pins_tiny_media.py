"""What the tests that pin the embedded model's outputs will see with a candidate model, and how
firmly: run it on a model directory before shipping it as `gemma3n/data/tiny`, then re-pin the
tests it reports as changed (docs/tiny-media.md, nineteenth round).

- the shipped sample's transcript, one line a window (tests/test_tiny_speech.py `PINNED`);
- the greedy texts of tests/test_tiny_model.py (`GREEDY_8`, `GREEDY_4_E2B`), and whether its chat
  turn `CHAT_THAT_ENDS` is answered with a reply that ends its turn;
- the shipped image's answers at 256 / 512 / 768 px (tests/test_tiny_vision.py `ANSWERS`);
- for each candidate prompt, how many E2B-like drafts are kept and how many rejected in
  tests/test_speculative.py's sampled check (it asks more than a quarter of its samples of each,
  so that both branches of the acceptance rule run).

Each greedy text comes with its smallest top-1 margin (log probability of the chosen token minus
the runner-up's, over the tokens it wrote): a margin far above float noise across CPUs (~1e-6) is
a pin that holds on every CPU kind.

    python tools/pins_tiny_media.py --model /work/tiny-mm/run [--prompts "For the LORD" ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gemma3n  # noqa: E402
from gemma3n.speech import SR, speech_prompt, transcribe  # noqa: E402
from tests.test_speculative import SAMPLING, _sampled_joint  # noqa: E402
from tests.test_tiny_model import CHAT_LIMIT, CHAT_THAT_ENDS, GREEDY_4_E2B, GREEDY_8  # noqa: E402
from tests.test_tiny_speech import PINNED, SAMPLE  # noqa: E402
from tests.test_tiny_vision import ANSWERS, IMAGE  # noqa: E402
from tools.tiny_media_data import QUESTIONS  # noqa: E402

SPECULATIVE_PROMPTS = ["For the LORD", "Thus saith the LORD", "The LORD is my shepherd", "And God said"]


def smallest_margin(result) -> float:
    """The smallest top-1 margin along a greedy result asked with logprobs=True, top_logprobs=2."""
    gaps = [lp.top[0].logprob - lp.top[1].logprob for lp in result.logprobs if len(lp.top) > 1]
    return round(min(gaps), 4) if gaps else float("inf")


def pins(model_dir: Path, prompts: list[str]) -> dict:
    model = gemma3n.load(model_dir)
    greedy = dict(temperature=0, logprobs=True, top_logprobs=2)
    out: dict = {}
    wave, rate = sf.read(SAMPLE, dtype="float32")
    assert rate == SR
    lines = []
    for seg in transcribe(model, str(SAMPLE)).segments:
        piece = wave[int(seg.start * SR) : int(seg.end * SR)]
        content = [{"type": "text", "text": speech_prompt()}, {"type": "audio", "audio": piece}]
        r = model.generate(messages=[{"role": "user", "content": content}], max_tokens=96, **greedy)
        lines.append({"text": seg.text, "window_s": [seg.start, seg.end], "margin": smallest_margin(r)})
    out["sample"] = {"unchanged": [x["text"] for x in lines] == PINNED, "lines": lines}
    for name, size, n, pinned in (("GREEDY_8", None, 8, GREEDY_8), ("GREEDY_4_E2B", "E2B-like", 4, GREEDY_4_E2B)):
        r = model.generate("In the beginning", max_tokens=n, size=size, **greedy)
        out[name] = {"text": r.text, "unchanged": r.text == pinned, "margin": smallest_margin(r)}
    r = model.generate(messages=[{"role": "user", "content": CHAT_THAT_ENDS}], max_tokens=CHAT_LIMIT, **greedy)
    ends = r.finish_reason == "stop" and len(r.token_ids) < CHAT_LIMIT
    out["CHAT_THAT_ENDS"] = {"text": r.text, "ends": ends, "margin": smallest_margin(r)}
    out["image"] = {}
    for task, answer in ANSWERS.items():
        content = [{"type": "image", "image": str(IMAGE)}, {"type": "text", "text": QUESTIONS[task]}]
        for size in (256, 512, 768):
            r = model.generate(messages=[{"role": "user", "content": content}], image_size=size, **greedy)
            out["image"][f"{task}@{size}"] = {"right": r.text.strip() == answer, "margin": smallest_margin(r)}
    out["speculative"] = {}
    for prompt in prompts:
        ids = model.tokenizer.encode(prompt)
        _, drafts = _sampled_joint(model, ids, 3, SAMPLING, draft="E2B-like", draft_k=2)
        kept = drafts["accepted_tokens"]
        out["speculative"][prompt] = {"kept": kept, "rejected": drafts["draft_tokens"] - kept}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a model directory (a training run's --out)")
    ap.add_argument("--prompts", nargs="*", default=SPECULATIVE_PROMPTS, help="speculative-decoding prompts to try")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here as JSON")
    args = ap.parse_args()
    report = pins(args.model, args.prompts)
    text = json.dumps(report, indent=1, default=float)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
