"""Synthetic speech and images for the embedded model's audio and vision towers, made here and
offline (nothing is downloaded).

Speech: KJV verses (the text model's own corpus and held-out split, tools/kjv_corpus.py), and past
them pieces of the longer verses cut at their punctuation (`--train-clips 44000`: all of both), spoken by
espeak-ng (Debian package `espeak-ng`) with several voices, variants, speeds and pitches, resampled
to 16 kHz. Noise, gain and silence are added at training time (`augment`), so one stored clip
serves many steps. Held out for evaluation: verses of the held-out chapters, spoken with a voice
setting never used in training (HELD_OUT_VOICE).

Images: Pillow scenes of 1-4 shapes of one kind and one colour on a light background, with
questions about colour, shape and count and a short description (`render_scene`, `qa_pairs`);
rendered on the fly (a scene takes about a millisecond), seeded.

    python tools/tiny_media_data.py --out /work/tiny-mm/speech          # ~4 min on one core
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kjv_corpus import HELD_OUT_EVERY, kjv_chapters  # noqa: E402

SR = 16_000
MAX_SECONDS = 10.0  # the tiny model's encoder window (preprocessor max_length 160000)

# espeak-ng voices x variants used in training; the held-out setting uses a variant none of them has
TRAIN_VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"]
TRAIN_VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+f1", "+f2", "+f4"]
Setting = tuple[str, int, int]  # espeak-ng voice+variant, words per minute, pitch
HELD_OUT_VOICE = ("en-us+f3", 168, 58)  # voice+variant, words per minute, pitch


# ---------------------------------------------------------------------------------------------
# Speech


def verses(held_out: bool) -> list[str]:
    """The verses of the training chapters (or of the held-out ones), in order."""
    out = []
    for i, chapter in enumerate(kjv_chapters()):
        if (i % HELD_OUT_EVERY == 0) == held_out:
            out += chapter.split("\n")[1:]  # the first line is the chapter heading
    return out


def utterances(held_out: bool, min_words: int = 6, max_words: int = 24) -> list[str]:
    """Single verses of `min_words`..`max_words` words: 3-10 s when spoken at 150-190 words a minute."""
    return [v for v in verses(held_out) if min_words <= len(v.split()) <= max_words]


def verse_pieces(held_out: bool, min_words: int = 6, max_words: int = 24) -> list[str]:
    """The verses longer than `max_words`, cut at their punctuation into runs of whole clauses of
    `min_words`..`max_words` words (a clause longer than that is dropped, and so is a run left too
    short before it). More text once the single verses are used up, and utterances that begin
    inside a sentence, as a recording's windows do."""
    out = []
    for verse in verses(held_out):
        if len(verse.split()) <= max_words:
            continue
        run: list[str] = []
        for clause in re.findall(r"[^,;:.?!]+[,;:.?!]*", verse):
            words = clause.split()
            if len(run) + len(words) <= max_words:
                run += words
                continue
            if len(run) >= min_words:
                out.append(" ".join(run).rstrip(",;:"))
            run = words if len(words) <= max_words else []
        if len(run) >= min_words:
            out.append(" ".join(run).rstrip(",;:"))
    return out


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's rendering of `text` as float32 at 16 kHz."""
    import soxr

    raw = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        capture_output=True,
        check=True,
    ).stdout
    wave = np.frombuffer(raw[44:], dtype="<i2").astype(np.float32) / 32768.0  # 44-byte RIFF header
    return soxr.resample(wave, 22050, SR).astype(np.float32)


def trim(wave: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    """Drop espeak's leading and trailing silence (augment adds its own)."""
    loud = np.flatnonzero(np.abs(wave) > threshold)
    return wave[loud[0] : loud[-1] + 1] if len(loud) else wave[:0]


# the command-line help of the tools' --bare-edges (augment's `bare`)
BARE_EDGES_HELP = (
    "the share of training clips sent with no silence before their first word, and (drawn apart) after their "
    "last, as trimmed clips are (tiny_media_data.augment); 0 draws the earlier runs' stream"
)


def augment(
    wave: np.ndarray, rng: np.random.Generator, max_seconds: float = MAX_SECONDS, bare: float = 0.0
) -> np.ndarray:
    """Random gain, leading/trailing silence (within the window) and white or brown noise at 15-45 dB SNR.
    `bare`: the share of clips left with no silence before their first word, and (drawn apart) of
    those with none after their last, as a trimmed recording is sent (the held-out clips are: a
    decoder that never saw one stopped at once on 4 of 128 of them, docs/tiny-media.md, seventeenth
    round). At 0 the random stream is the one earlier runs drew."""
    room = max(0, int(max_seconds * SR) - len(wave))
    lead = int(rng.uniform(0, min(0.5 * SR, room)))
    tail = int(rng.uniform(0, min(0.4 * SR, room - lead)))
    if bare > 0:
        lead, tail = (0 if rng.random() < bare else lead), (0 if rng.random() < bare else tail)
    out = np.concatenate([np.zeros(lead, np.float32), wave, np.zeros(tail, np.float32)])
    out *= rng.uniform(0.25, 1.0) / max(1e-4, float(np.abs(out).max()))
    if rng.random() < 0.8:
        noise = rng.standard_normal(len(out)).astype(np.float32)
        if rng.random() < 0.5:  # brown: integrated white noise, low-frequency rumble
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
        power = float(np.mean(wave**2)) * (out.max() / max(1e-4, np.abs(wave).max())) ** 2
        snr_db = rng.uniform(15, 45)
        noise *= np.sqrt(power / 10 ** (snr_db / 10) / max(1e-12, float(np.mean(noise**2))))
        out = out + noise
    return np.clip(out, -1, 1).astype(np.float32)


@dataclass
class Clips:
    """Clips stored end to end: clip i is audio[offsets[i]:offsets[i + 1]] (int16, 16 kHz)."""

    audio: np.ndarray
    offsets: np.ndarray
    texts: list[str]
    voices: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def wave(self, i: int) -> np.ndarray:
        return self.audio[self.offsets[i] : self.offsets[i + 1]].astype(np.float32) / 32768.0

    def save(self, path: Path) -> None:
        """path.npy (the samples, memory-mapped when loaded) and path.json (offsets, texts, voices)."""
        np.save(path.with_suffix(".npy"), self.audio)
        meta = {"offsets": self.offsets.tolist(), "texts": self.texts, "voices": self.voices}
        path.with_suffix(".json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> Clips:
        meta = json.loads(path.with_suffix(".json").read_text())
        audio = np.load(path.with_suffix(".npy"), mmap_mode="r")
        return cls(audio, np.asarray(meta["offsets"]), meta["texts"], meta["voices"])


def make_clips(texts: list[str], settings: list[Setting], max_seconds: float) -> Clips:
    pieces, kept, voices = [], [], []
    for text, (voice, speed, pitch) in zip(texts, settings):
        wave = trim(speak(text, voice, speed, pitch))
        if 0 < len(wave) <= (max_seconds - 0.3) * SR:  # room for some silence around it
            pieces.append(np.round(wave * 32767).astype(np.int16))
            kept.append(text)
            voices.append(f"{voice} -s {speed} -p {pitch}")
    offsets = np.cumsum([0] + [len(p) for p in pieces])
    return Clips(np.concatenate(pieces), offsets, kept, voices)


def train_settings(rng: random.Random, n: int) -> list[Setting]:
    return [
        (rng.choice(TRAIN_VOICES) + rng.choice(TRAIN_VARIANTS), rng.randint(145, 190), rng.randint(30, 75))
        for _ in range(n)
    ]


def recording(texts: list[str], setting: tuple[str, int, int], pause_s: tuple[float, float], seed: int) -> np.ndarray:
    """Consecutive verses read with pauses between them (a long recording), float32 16 kHz."""
    rng = np.random.default_rng(seed)
    parts = []
    for text in texts:
        parts += [trim(speak(text, *setting)), np.zeros(int(rng.uniform(*pause_s) * SR), np.float32)]
    wave = np.concatenate(parts)
    noise = rng.standard_normal(len(wave)).astype(np.float32) * 0.002  # a quiet room, not digital silence
    return np.clip(0.8 * wave / np.abs(wave).max() + noise, -1, 1).astype(np.float32)


def chapter_verses(chapter_index: int) -> tuple[str, list[str]]:
    lines = kjv_chapters()[chapter_index].split("\n")
    return lines[0], lines[1:]


FIRST_DRAW = 12_000  # training settings drawn before the held-out shuffle (the default --train-clips)


def plan_clips(seed: int, train_clips: int, heldout_clips: int) -> tuple[list[str], list[Setting], list[str]]:
    """The training texts and their voice settings, and the held-out texts, for one seed.

    One seeded stream in a fixed order: the training verses' shuffle, FIRST_DRAW settings, the
    held-out verses' shuffle, then settings for clips past FIRST_DRAW. So the held-out set, and the
    first clips of the training set, do not depend on --train-clips: a larger set only adds clips.
    Past the single verses come the longer verses' pieces (`verse_pieces`), in a shuffle of their
    own seeded stream, so they too only add clips.
    """
    rng = random.Random(seed)
    train_texts = utterances(held_out=False)
    rng.shuffle(train_texts)
    settings = train_settings(rng, FIRST_DRAW)
    held_texts = utterances(held_out=True, min_words=12)
    rng.shuffle(held_texts)
    settings += train_settings(rng, max(0, train_clips - FIRST_DRAW))
    if train_clips > len(train_texts):
        pieces = verse_pieces(held_out=False)
        random.Random(f"pieces-{seed}").shuffle(pieces)
        train_texts += pieces
    n = min(train_clips, len(train_texts))
    return train_texts[:n], settings[:n], held_texts[:heldout_clips]


# ---------------------------------------------------------------------------------------------
# Images

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ["circle", "square", "triangle", "diamond"]
COUNTS = ["one", "two", "three", "four"]
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What shape are they?",
    "count": "How many shapes are there?",
    "describe": "Describe the image.",
}


@dataclass
class Scene:
    colour: str
    shape: str
    count: int

    def answer(self, task: str) -> str:
        if task == "colour":
            return self.colour
        if task == "shape":
            return self.shape
        if task == "count":
            return COUNTS[self.count - 1]
        return f"{COUNTS[self.count - 1]} {self.colour} {self.shape}{'s' if self.count > 1 else ''}"


# shape radius as a share of the side: as large as four shapes fit without overlapping (small shapes on
# a large background were not learnt in an hour), and the same range at every count. When the radius
# shrank with the count the painted area said nothing about it, and count stayed at chance at 768 px
# (docs/tiny-media.md, third round).
RADIUS = {count: (0.12, 0.17) for count in (1, 2, 3, 4)}


def render_scene(
    rng: random.Random, side: int = 384, scene: Scene | None = None, radius: tuple[float, float] | None = None
):
    """A PIL image of `scene` (random if None): non-overlapping shapes, jittered colours, a light
    background with a faint gradient. Returns (image, scene)."""
    from PIL import Image, ImageDraw

    if scene is None:
        scene = Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 4))
    bg = [rng.randint(200, 255) for _ in range(3)]
    img = Image.new("RGB", (side, side), tuple(bg))
    draw = ImageDraw.Draw(img)
    for y in range(0, side, 8):  # faint vertical gradient
        shade = int(12 * y / side)
        draw.rectangle([0, y, side, y + 8], fill=tuple(max(0, c - shade) for c in bg))
    base = COLOURS[scene.colour]
    radius = radius or RADIUS[scene.count]
    boxes: list[tuple[float, float, float]] = []
    for _ in range(scene.count):
        for _attempt in range(200):
            r = rng.uniform(*radius) * side
            cx, cy = rng.uniform(r + 2, side - r - 2), rng.uniform(r + 2, side - r - 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 0.02 * side) ** 2 for x, y, q in boxes):
                break
        boxes.append((cx, cy, r))
        fill = tuple(int(min(255, max(0, c + rng.randint(-20, 20)))) for c in base)
        if scene.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif scene.shape == "square":
            s = r * 0.85
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    return img, scene


def normalize_words(text: str) -> str:
    """Lower case, punctuation dropped: how WER is counted here."""
    return " ".join(re.sub(r"[^\w' ]", " ", text.lower()).split())


def word_casing(lines: list[str]) -> dict[str, str]:
    """Each word's most frequent spelling inside a sentence in `lines` ("the", "LORD",
    "Israel", "I"), keyed by its lower case: the one spelling a word has however it is placed, so a
    word's tokens follow from its sound (`spoken_text`). Sentence starts do not count: there every
    word is capitalised ("And", "For")."""
    counts: dict[str, dict[str, int]] = {}
    for line in lines:
        initial = True
        for m in re.finditer(r"[\w']+|[.;:?!]", line):
            word = m.group(0)
            if word in ".;:?!":
                initial = True
                continue
            if not initial:
                forms = counts.setdefault(word.lower(), {})
                forms[word] = forms.get(word, 0) + 1
            initial = False
    return {key: max(forms, key=forms.__getitem__) for key, forms in counts.items()}


def spoken_text(text: str, casing: dict[str, str]) -> str:
    """What can be heard of `text`: its words in `word_casing`'s spelling (lower case when unknown),
    punctuation dropped, each word after a space (so the first word's tokens are every other word's).
    CTC labels made from it carry no sound-less token (a comma, a capital at a sentence start)."""
    return "".join(" " + casing.get(w.lower(), w.lower()) for w in re.sub(r"[^\w' ]", " ", text).split())


def spoken_transcripts(texts: list[str]) -> list[str]:
    """`spoken_text` of each of `texts` in the training verses' `word_casing`: the audio tower's
    spoken CTC labels, and the decoder's transcripts when it is trained to write what it hears."""
    casing = word_casing(verses(held_out=False))
    return [spoken_text(t, casing) for t in texts]


# ---------------------------------------------------------------------------------------------

SAMPLE_VERSES = 4  # Genesis 1:1-4 (chapter 0 is held out: the model never trained on it)
SAMPLE_SCENE = Scene("blue", "triangle", 3)


def write_samples(folder: Path) -> None:
    """The shipped samples: about 20 s of held-out verses in the held-out voice (FLAC, 16 kHz) and a
    held-out scene (PNG)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    heading, lines = chapter_verses(0)
    wave = recording(lines[:SAMPLE_VERSES], HELD_OUT_VOICE, (0.6, 0.9), seed=7)
    sf.write(folder / "genesis-1.ogg", wave, SR, format="OGG", subtype="VORBIS")  # ~5x smaller than FLAC
    (folder / "genesis-1.txt").write_text(" ".join(lines[:SAMPLE_VERSES]) + "\n")
    img, _ = render_scene(random.Random(7), 384, SAMPLE_SCENE)
    img.save(folder / "three-blue-triangles.png", optimize=True)
    print(f"{heading}: {len(wave) / SR:.1f} s; {SAMPLE_SCENE}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-clips", type=int, default=FIRST_DRAW)
    ap.add_argument("--heldout-clips", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=Path, default=None, help="write only the shipped samples into this folder")
    args = ap.parse_args()
    if args.samples:
        write_samples(args.samples)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_texts, settings, held_texts = plan_clips(args.seed, args.train_clips, args.heldout_clips)
    train = make_clips(train_texts, settings, MAX_SECONDS)
    train.save(args.out / "train")
    print(f"train: {len(train)} clips, {len(train.audio) / SR / 3600:.2f} h ({time.time() - t0:.0f} s)", flush=True)

    held = make_clips(held_texts, [HELD_OUT_VOICE] * len(held_texts), MAX_SECONDS)
    held = Clips(held.audio, held.offsets, held.texts, held.voices)
    # held-out clips keep 5-10 s only (the acceptance's clip length)
    keep = [i for i in range(len(held)) if 5 * SR <= held.offsets[i + 1] - held.offsets[i]]
    pieces = [held.audio[held.offsets[i] : held.offsets[i + 1]] for i in keep]
    held = Clips(
        np.concatenate(pieces),
        np.cumsum([0] + [len(p) for p in pieces]),
        [held.texts[i] for i in keep],
        [held.voices[i] for i in keep],
    )
    held.save(args.out / "heldout")
    print(f"held-out: {len(held)} clips of 5-10 s ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
