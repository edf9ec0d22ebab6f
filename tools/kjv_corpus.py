"""The training corpus of the embedded default model: the King James Version of the Bible (1611,
public domain), read from Debian's `bible-kjv-text` package through the `bible` reader of
`bible-kjv` (nothing is downloaded; `apt-get install bible-kjv bible-kjv-text`).

Shared by tools/train_tiny.py (training) and tools/eval_tiny.py (held-out perplexity): one document
per chapter, every HELD_OUT_EVERY-th chapter held out.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import torch

BIBLE_DATA = Path("/usr/lib/bible.data")
HELD_OUT_EVERY = 20  # every 20th chapter is held out (never trained on)


def kjv_chapters() -> list[str]:
    """The KJV as one text per chapter: a heading line, then one verse per line (numbers dropped)."""
    exe = shutil.which("bible")
    if exe is None or not BIBLE_DATA.exists():
        raise SystemExit(
            "the training corpus is missing: this script reads the King James Bible from the Debian "
            f"packages bible-kjv-text ({BIBLE_DATA}) and bible-kjv (the `bible` reader). Install them "
            "with:  apt-get install bible-kjv bible-kjv-text"
        )
    out = subprocess.run(
        [exe, "-m", "8192", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    chapters: list[str] = []
    head, verses = None, []
    for line in out.splitlines():
        m = re.match(r"^\s+\d+ (.*)$", line)
        if m:
            verses.append(m.group(1).strip())
        elif line.strip():
            if head and verses:
                chapters.append(head + "\n" + "\n".join(verses))
            head, verses = line.strip(), []
    if head and verses:
        chapters.append(head + "\n" + "\n".join(verses))
    if len(chapters) < 1000:
        raise SystemExit(f"the `bible` reader returned only {len(chapters)} chapters; is {BIBLE_DATA} intact?")
    return chapters


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    """<bos> text <eos> per document (the tokenizer's post-processor adds <bos>), concatenated."""
    eos = tok.token_to_id("<eos>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def split(chapters: list[str]) -> tuple[list[str], list[str]]:
    """(train chapters, held-out chapters)."""
    train = [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY]
    held = [c for i, c in enumerate(chapters) if i % HELD_OUT_EVERY == 0]
    return train, held
