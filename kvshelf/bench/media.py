"""Deterministic test media: images, 16 kHz mono WAV clips and MP4 clips.

Every file is generated from a fixed seed, so the same library versions give the same bytes on
every run and host; distinct variants differ in content, so vLLM gives them distinct content
hashes. Files are written atomically (temp file + `os.replace`) and only when missing or
different, so `make_media` is idempotent and cheap to call from every test.
"""

from __future__ import annotations

import io
import mimetypes
import os
import tempfile
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np

AUDIO_SAMPLE_RATE_HZ = 16_000  # what vLLM's audio models expect; avoids resampling

# Suffixes Python's mimetypes may not know on every host.
_EXTRA_MIME = {
    ".wav": "audio/wav",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
    ".webp": "image/webp",
}


def mime_of(name: str | os.PathLike[str]) -> str:
    """The MIME type of a file name (or URL path) from its suffix; "" when unknown."""
    suffix = Path(name).suffix.lower()
    return _EXTRA_MIME.get(suffix) or mimetypes.guess_type(str(name))[0] or ""


def image_bytes(seed: int, width_px: int = 320, height_px: int = 240, fmt: str = "PNG") -> bytes:
    """An image of coloured rectangles on a coloured background, encoded as PNG or JPEG."""
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)

    def colour() -> tuple[int, int, int]:
        red, green, blue = (int(c) for c in rng.randint(0, 255, 3))
        return red, green, blue

    image = Image.new("RGB", (width_px, height_px), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.randint(0, width_px - 20)), int(rng.randint(0, height_px - 20))
        x1, y1 = x0 + int(rng.randint(10, 80)), y0 + int(rng.randint(10, 80))
        draw.rectangle((x0, y0, x1, y1), fill=colour())
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


def wav_bytes(frequencies_hz: tuple[float, ...], duration_s: float) -> bytes:
    """A 16 kHz mono 16-bit WAV: a sum of sines (stdlib `wave`, so no codec variance)."""
    t = np.arange(int(duration_s * AUDIO_SAMPLE_RATE_HZ)) / AUDIO_SAMPLE_RATE_HZ
    signal = sum(np.sin(2 * np.pi * f * t) for f in frequencies_hz) / (2 * len(frequencies_hz))
    samples = (np.asarray(signal) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(AUDIO_SAMPLE_RATE_HZ)
        out.writeframes(samples.tobytes())
    return buf.getvalue()


def mp4_bytes(
    seed: int, num_frames: int = 16, fps: int = 8, size_px: int = 224, height_px: int | None = None
) -> bytes:
    """An MP4 (mpeg4) clip of a white box sliding over a changing background; square
    unless ``height_px`` is given."""
    import cv2

    rng = np.random.RandomState(seed)
    base = rng.randint(0, 200, 3)
    width, height = size_px, height_px or size_px
    # OpenCV writes only to a path; the clip goes through a temp file.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write MP4 (mp4v); is its FFmpeg backend present?")
        for i in range(num_frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[:, :] = base
            frame[:, :, i % 3] = (40 + 12 * i + int(base[i % 3])) % 256
            x0 = 10 + (8 * i) % max(1, width - 70)
            cv2.rectangle(frame, (x0, 20), (x0 + 50, 90), (255, 255, 255), -1)
            writer.write(frame)
        writer.release()
        return Path(path).read_bytes()


# name -> (file name, generator). Images differ in seed, size and format; audio in pitch and
# length; video in colours.
MEDIA: dict[str, tuple[str, Callable[[], bytes]]] = {
    "image_a": ("image_a.png", lambda: image_bytes(1)),
    "image_b": ("image_b.jpg", lambda: image_bytes(2, fmt="JPEG")),
    "image_c": ("image_c.png", lambda: image_bytes(3, 640, 480)),
    "image_d": ("image_d.jpg", lambda: image_bytes(4, 480, 360, fmt="JPEG")),
    "audio_a": ("audio_a.wav", lambda: wav_bytes((440.0, 1234.0), 3.0)),
    "audio_b": ("audio_b.wav", lambda: wav_bytes((330.0, 880.0, 2000.0), 2.0)),
    "video_a": ("video_a.mp4", lambda: mp4_bytes(1)),
    "video_b": ("video_b.mp4", lambda: mp4_bytes(2)),
}


# Stand-ins for the media of the multimodal client LMCache's page runs, of similar sizes,
# for hosts that cannot download the originals: a 2560-px photo (single-image), two
# photos (multi-image), a 15-s 1280x720 clip at 24 fps (video) and two audio clips.
PAGE_MEDIA: dict[str, tuple[str, Callable[[], bytes]]] = {
    "boardwalk": ("boardwalk.jpg", lambda: image_bytes(11, 2560, 1707, fmt="JPEG")),
    "duck": ("duck.jpg", lambda: image_bytes(12, 1600, 1200, fmt="JPEG")),
    "lion": ("lion.jpg", lambda: image_bytes(13, 1600, 1067, fmt="JPEG")),
    "video": (
        "video.mp4",
        lambda: mp4_bytes(14, num_frames=360, fps=24, size_px=1280, height_px=720),
    ),
    "audio": ("audio.wav", lambda: wav_bytes((220.0, 660.0, 1500.0), 10.0)),
    "audio_2": ("audio_2.wav", lambda: wav_bytes((300.0, 1200.0), 20.0)),
}


def make_page_media(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the stand-ins for the page client's media (PAGE_MEDIA) into `out_dir`."""
    return _make(out_dir, PAGE_MEDIA)


def make_media(out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write every test medium into `out_dir` (created if needed); returns name -> path.

    Names: image_a..image_d (PNG/JPEG), audio_a/audio_b (WAV), video_a/video_b (MP4).
    """
    return _make(out_dir, MEDIA)


def _make(
    out_dir: str | os.PathLike[str], media: dict[str, tuple[str, Callable[[], bytes]]]
) -> dict[str, Path]:
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, (file_name, generate) in media.items():
        path = out / file_name
        _write_if_changed(path, generate())
        paths[name] = path
    return paths


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
