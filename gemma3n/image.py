"""Images and video frames in: decoding an image from a path, bytes, a data URI, an array or a
Pillow image (with clear errors for what cannot be read), Gemma 3n's image processor (resize to a
square, rescale; docs/audio-vision.md), and video frames sampled at a rate with their timestamps.
The tower that encodes them is vision.py.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, InputError
from .inline import decode_data_uri

# ---------------------------------------------------------------------------------------------------
# Image input
# ---------------------------------------------------------------------------------------------------

# Pillow's own default (~89.5 Mpx, a 1024x1024x3 bomb at 1:1000); above it an image is refused
# rather than decoded (Pillow only warns between 1x and 2x this limit, we refuse both).
MAX_IMAGE_PIXELS = 89_478_485


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is in the vision extra
        raise InputError("images need Pillow: pip install 'gemma3n[vision]'") from e
    return Image


def _describe(src: Any) -> str:
    if isinstance(src, (str, Path)):
        s = str(src)
        return f"image data URI ({len(s)} chars)" if s.startswith("data:") else f"image file {s}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(src)} bytes)"
    return f"image {type(src).__name__}"


def _open_encoded(data: bytes | str | Path, name: str) -> Any:
    """Decode an encoded image fully (first frame), turning every failure into InputError."""
    Image = _pil()
    fp: Any = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{img.width}x{img.height}")
            img.seek(0)  # GIF / APNG / multi-page: first frame
            img.load()  # decode now so that truncation is reported here
    except FileNotFoundError as e:
        raise InputError(f"{name}: no such file") from e
    except IsADirectoryError as e:
        raise InputError(f"{name}: is a directory, not an image") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(
            f"{name}: image too large ({e}); limit {MAX_IMAGE_PIXELS} pixels (decompression-bomb guard)"
        ) from e
    except Image.UnidentifiedImageError as e:
        raise InputError(f"{name}: not a readable image (unknown or corrupt format)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{name}: unreadable or truncated image ({e})") from e
    return img


def _array_to_pil(arr: np.ndarray, name: str) -> Any:
    """HWC (or HW) uint8 / float array -> PIL. Floats are taken as [0, 1] intensities."""
    Image = _pil()
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise InputError(f"{name}: expected an HxW, HxWx3 or HxWx4 array, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"{name}: unsupported array dtype {arr.dtype}")
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    mode = "L" if arr.ndim == 2 else {3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def _to_rgb(img: Any) -> Any:
    """Any mode -> RGB, compositing transparency onto white exactly like transformers'
    `image_transforms.convert_to_rgb` (so our RGB image processes like HF's RGBA one)."""
    Image = _pil()
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(src: Any) -> Any:
    """Load one image as an RGB `PIL.Image.Image` with its EXIF orientation applied.

    `src`: a path (str / Path), a `data:image/...;base64,` URI, encoded bytes, a PIL image, or an
    HxW / HxWxC numpy array (uint8, or float in [0, 1]). Raises `InputError` naming the source for
    unreadable, truncated, zero-size or oversized (decompression-bomb) input.
    """
    Image = _pil()
    from PIL import ImageOps

    name = _describe(src)
    if isinstance(src, str) and src.startswith("data:"):
        src = decode_data_uri(src, name, "image")
    if isinstance(src, (bytearray, memoryview)):
        src = bytes(src)
    if isinstance(src, bytes):
        if not src:
            raise InputError(f"{name}: empty image data")
        img = _open_encoded(src, name)
    elif isinstance(src, (str, Path)):
        if isinstance(src, str) and src.split("://", 1)[0] in ("http", "https", "ftp"):
            raise InputError(f"{name}: URLs are not fetched; download the image and pass the file")
        p = Path(src).expanduser()
        if p.is_file() and p.stat().st_size == 0:
            raise InputError(f"{name}: empty file (0 bytes)")
        img = _open_encoded(p, name)
    elif isinstance(src, Image.Image):
        img = src
        try:
            img.load()  # a lazily opened file may still be truncated
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{name}: unreadable or truncated image ({e})") from e
    elif isinstance(src, np.ndarray):
        if src.size == 0:
            raise InputError(f"{name}: zero-size array {tuple(src.shape)}")
        img = _array_to_pil(src, name)
    elif isinstance(src, torch.Tensor):
        raise InputError(f"{name}: pass images as paths, bytes, PIL images or numpy arrays (HWC)")
    else:
        raise InputError(f"{name}: unsupported image input type")

    if img.width == 0 or img.height == 0:
        raise InputError(f"{name}: zero-size image ({img.width}x{img.height})")
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise InputError(f"{name}: image too large ({img.width}x{img.height} > {MAX_IMAGE_PIXELS} pixels)")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a corrupt EXIF block must not take the request down
        warnings.warn(f"{name}: ignoring unreadable EXIF orientation ({e})", stacklevel=2)
    return _to_rgb(img)


# ---------------------------------------------------------------------------------------------------
# Image processor (docs/audio-vision.md#image-processor): resize to a square, uint8 rounding,
# x/255, no normalisation by default
# ---------------------------------------------------------------------------------------------------

# PIL resample ids -> torchvision InterpolationMode names, as transformers' pil_torch_interpolation_mapping.
_RESAMPLE = {0: "NEAREST_EXACT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class ImageProcessor:
    """Bit-for-bit the transformers 5.24 `SiglipImageProcessor` (torchvision backend) that Gemma 3n
    checkpoints name: RGB uint8 -> `torchvision.transforms.v2.functional.resize` (antialias) ->
    `* rescale_factor` (-> float32 in [0, 1]) -> optional mean/std normalisation (off for Gemma 3n)."""

    def __init__(
        self,
        size: int | tuple[int, int] = 768,
        resample: int = 2,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = False,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        image_seq_length: int = 256,
    ) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if resample not in _RESAMPLE:
            raise ConfigError(f"image processor: unsupported resample {resample!r} (expected one of 0..5)")
        self.resample = resample
        self.do_resize = do_resize
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.image_seq_length = image_seq_length

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessor:
        """From a `preprocessor_config.json`-style dict (unknown keys ignored; null means default)."""
        kw: dict[str, Any] = {}
        size = d.get("size")
        if isinstance(size, Mapping):
            if "height" in size and "width" in size:
                kw["size"] = (int(size["height"]), int(size["width"]))
            elif "shortest_edge" in size:
                kw["size"] = int(size["shortest_edge"])
            else:
                raise ConfigError(f"image processor: unsupported size {dict(size)!r}")
        elif isinstance(size, int):
            kw["size"] = size
        for key in (
            "resample",
            "do_resize",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_seq_length",
        ):
            if d.get(key) is not None:
                kw[key] = d[key]
        for key in ("image_mean", "image_std"):
            v = d.get(key)
            if v is not None:
                kw[key] = (v,) * 3 if isinstance(v, (int, float)) else v
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageProcessor:
        """Read `preprocessor_config.json` (shared with the audio extractor) or the `image_processor`
        section of `processor_config.json`; the reference defaults when neither exists."""
        path = Path(path)
        merged: dict[str, Any] = {}
        for fname in ("preprocessor_config.json", "processor_config.json"):
            f = path / fname
            if not f.is_file():
                continue
            try:
                d = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"{f}: not valid JSON ({e})") from e
            if fname == "processor_config.json":
                if "image_seq_length" in d and "image_seq_length" not in merged:
                    merged["image_seq_length"] = d["image_seq_length"]
                d = d.get("image_processor") or {}
            for k, v in d.items():
                merged.setdefault(k, v)
        return cls.from_dict(merged)

    def preprocess_one(self, image: Any, size: tuple[int, int]) -> Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        img = load_image(image)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W] uint8
        if self.do_resize:
            mode = getattr(InterpolationMode, _RESAMPLE[self.resample])
            x = tvF.resize(x, list(size), interpolation=mode, antialias=True)
        if self.do_rescale and self.do_normalize:
            # transformers fuses the two: normalize(x, mean / factor, std / factor)
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return tvF.normalize(x.to(torch.float32), mean.tolist(), std.tolist())
        if self.do_rescale:
            return x * self.rescale_factor  # uint8 * python float -> float32, as in transformers
        x = x.to(torch.float32)
        return tvF.normalize(x, list(self.image_mean), list(self.image_std)) if self.do_normalize else x

    def __call__(self, images: Sequence[Any], size: int | None = None) -> Tensor:
        """images -> pixel_values [N, 3, H, W] float32. `size` overrides the square side
        (256 / 512 / 768 are the resolutions MobileNet-V5 was trained for)."""
        if isinstance(images, (str, bytes, Path, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        if not images:
            raise InputError("no images given")
        if size is not None:
            if not isinstance(size, int) or size < 32:
                raise InputError(f"--image-size must be an integer >= 32, got {size!r}")
            hw = (size, size)
        else:
            hw = self.size
        return torch.stack([self.preprocess_one(im, hw) for im in images])


# ---------------------------------------------------------------------------------------------------
# Video (optional extra: PyAV)
# ---------------------------------------------------------------------------------------------------


def sample_video_frames(path: str | Path, fps: float = 1.0, max_frames: int = 32) -> list[tuple[float, Any]]:
    """Decode `path` and keep frames at `fps` (seconds apart = 1/fps), at most `max_frames`; when the
    clip is longer than max_frames/fps the sampling interval is stretched to cover it evenly.
    Returns [(timestamp_seconds, RGB PIL image)] in order."""
    name = f"video file {path}"
    if fps <= 0 or max_frames < 1:
        raise InputError(f"{name}: --fps must be > 0 and the frame budget >= 1 (got fps={fps}, max={max_frames})")
    try:
        import av
    except ImportError as e:
        raise InputError(f"{name}: video input needs PyAV: pip install 'gemma3n[video]'") from e
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{name}: no such file")
    try:
        container = av.open(str(p))
    except Exception as e:  # av.error.* (InvalidDataError, ...) derive from OSError / ValueError
        raise InputError(f"{name}: not a readable video ({e})") from e
    with container:
        if not container.streams.video:
            raise InputError(f"{name}: the file has no video stream")
        stream = container.streams.video[0]
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000  # av.time_base (microseconds)
        step = 1.0 / fps
        if duration and duration > 0 and duration / step > max_frames:
            step = duration / max_frames
        frames: list[tuple[float, Any]] = []
        next_t = 0.0
        try:
            for frame in container.decode(stream):
                t = frame.time
                if t is None:
                    t = len(frames) * step
                if t + 1e-6 < next_t:
                    continue
                frames.append((round(float(t), 3), frame.to_image().convert("RGB")))
                if len(frames) >= max_frames:
                    break
                while next_t <= t + 1e-6:
                    next_t += step
        except Exception as e:
            if not frames:
                raise InputError(f"{name}: cannot decode video frames ({e})") from e
    if not frames:
        raise InputError(f"{name}: no decodable video frames")
    return frames


def video_message_parts(path: str | Path, fps: float = 1.0, max_frames: int = 32) -> list[dict]:
    """A video as chat content parts: each sampled frame is an image preceded by its timestamp,
    e.g. [{"type": "text", "text": "Frame 00:01:"}, {"type": "image", "image": <PIL>}, ...]."""
    parts: list[dict] = []
    for t, frame in sample_video_frames(path, fps, max_frames):
        minutes, seconds = divmod(int(t), 60)
        parts.append({"type": "text", "text": f"Frame {minutes:02d}:{seconds:02d}:"})
        parts.append({"type": "image", "image": frame})
    return parts
