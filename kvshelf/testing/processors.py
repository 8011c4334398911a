"""Hugging Face processors for the tiny Phi-3.5-vision and Ultravox model dirs.

Both real models ship their processor as remote code in their hub repos, out of reach
offline, and vLLM has no processor of its own for either. A model dir built here carries a
copy of this file and names its classes in ``auto_map``; vLLM loads them with
``--trust-remote-code``, as it loads the real ones. Written from the models' public
behaviour and from what vLLM's ``phi3v.py`` and ``ultravox.py`` read from a processor.

What vLLM asks of them (vLLM tokenizes the prompt and expands the placeholders itself; it
calls a processor with dummy text, for the media tensors):

- Phi-3.5-vision: ``img_tokens`` (the ``<|image_i|>`` tags), the token count of an image
  from its size (``calc_num_image_tokens_from_image_size``), and per image ``pixel_values``
  (a global 336x336 view, then the HD crops, zero-padded to ``num_crops + 1``) and
  ``image_sizes`` (the padded HD size, height first).
- Ultravox: ``audio_processor`` (a Whisper feature extractor) and per 30-s chunk of audio
  ``audio_values`` (log-mel), ``audio_lens`` (valid mel frames), ``audio_token_len`` and
  ``audio_num_chunks`` per audio.

The file must stay self-contained (transformers copies it alone): it imports only numpy,
PIL, torch and transformers.
"""

from __future__ import annotations

import math
import re
from typing import Any, TypedDict

import numpy as np
from transformers import BatchFeature, Phi3Config, ProcessorMixin
from transformers.image_processing_base import ImageProcessingMixin

# --- Phi-3.5-vision ------------------------------------------------------------------------

CROP_PX = 336  # CLIP ViT-L/14 at 336 px: 24x24 patches, merged 2x2 into 12x12 tokens
_MERGED_SIDE = 12
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
_MAX_IMAGE_TAGS = 256


class Phi3VConfig(Phi3Config):
    """Phi-3's text config plus the vision fields (``img_processor``, ``embd_layer``) that
    vLLM's ``Phi3VForCausalLM`` reads; extra keys of a config are kept as attributes."""

    model_type = "phi3_v"


class _Phi3VImagesKwargs(TypedDict, total=False):
    num_crops: int


def hd_size(width: int, height: int, max_crops: int) -> tuple[int, int]:
    """The (width, height) an image is brought to: its long side resized to as many
    336-px crops as fit the crop budget with the aspect ratio kept, its short side
    padded up to whole crops."""
    landscape = width >= height
    long_px, short_px = (width, height) if landscape else (height, width)
    ratio = long_px / short_px
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= max_crops:
        scale += 1
    new_long = scale * CROP_PX
    new_short = max(1, int(new_long / ratio))
    padded_short = math.ceil(new_short / CROP_PX) * CROP_PX
    return (new_long, padded_short) if landscape else (padded_short, new_long)


def phi3v_num_image_tokens(width: int, height: int, max_crops: int) -> int:
    """Tokens vLLM's Phi-3.5-vision embeds for one image: 12x12 merged patches per crop with
    a newline token closing each row of the crop grid, one separator, then the global view
    (12 rows of 12 + a newline)."""
    padded_w, padded_h = hd_size(width, height, max_crops)
    rows, cols = padded_h // CROP_PX, padded_w // CROP_PX
    grid = rows * _MERGED_SIDE * (cols * _MERGED_SIDE + 1)
    return grid + 1 + _MERGED_SIDE * (_MERGED_SIDE + 1)


class Phi3VImageProcessor(ImageProcessingMixin):
    """HD transform: resize into a grid of at most ``num_crops`` 336-px crops (white
    padding), normalise with CLIP's mean and std."""

    valid_kwargs = _Phi3VImagesKwargs

    def __init__(self, num_crops: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_crops = num_crops

    def num_image_tokens(self, width: int, height: int) -> int:
        return phi3v_num_image_tokens(width, height, self.num_crops)

    def __call__(
        self, images: Any, return_tensors: str | None = None, **kwargs: Any
    ) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        pixel_values, sizes = [], []
        for image in images:
            crops, size = self._transform(image)
            pixel_values.append(crops)
            sizes.append(size)
        data = {"pixel_values": np.stack(pixel_values), "image_sizes": np.array(sizes)}
        return BatchFeature(data, tensor_type=return_tensors)

    def _transform(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        from PIL import Image

        image = _to_pil(image).convert("RGB")
        padded_w, padded_h = hd_size(image.width, image.height, self.num_crops)
        landscape = image.width >= image.height
        scaled = (
            (padded_w, round(image.height * padded_w / image.width))
            if landscape
            else (round(image.width * padded_h / image.height), padded_h)
        )
        scaled = (min(max(1, scaled[0]), padded_w), min(max(1, scaled[1]), padded_h))
        canvas = Image.new("RGB", (padded_w, padded_h), (255, 255, 255))
        canvas.paste(
            image.resize(scaled, Image.Resampling.BICUBIC),
            ((padded_w - scaled[0]) // 2, (padded_h - scaled[1]) // 2),
        )
        views = [canvas.resize((CROP_PX, CROP_PX), Image.Resampling.BICUBIC)]
        for top in range(0, padded_h, CROP_PX):
            for left in range(0, padded_w, CROP_PX):
                views.append(canvas.crop((left, top, left + CROP_PX, top + CROP_PX)))
        crops = np.zeros((self.num_crops + 1, 3, CROP_PX, CROP_PX), np.float32)
        mean, std = np.array(_CLIP_MEAN, np.float32), np.array(_CLIP_STD, np.float32)
        for i, view in enumerate(views):
            pixels = np.asarray(view, np.float32) / 255.0
            crops[i] = ((pixels - mean) / std).transpose(2, 0, 1)
        return crops, (padded_h, padded_w)


class Phi3VProcessor(ProcessorMixin):
    """Tokenizer + HD image processor. In ``input_ids`` the tag ``<|image_i|>`` becomes a
    run of ``-i`` as long as image i's token count, as Phi-3.5-vision's own processor does."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.img_tokens = [f"<|image_{i}|>" for i in range(1, _MAX_IMAGE_TAGS + 1)]

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return self.image_processor.num_image_tokens(width, height)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        data: dict[str, Any] = {}
        sizes: list[tuple[int, int]] = []
        if images is not None:
            features = self.image_processor(images)
            data.update(features)
            sizes = [(int(w), int(h)) for h, w in features["image_sizes"]]
        if text is not None:
            token_counts = [self.image_processor.num_image_tokens(w, h) for w, h in sizes]
            texts = [text] if isinstance(text, str) else list(text)
            ids = [self._expand(t, token_counts) for t in texts]
            if len({len(row) for row in ids}) > 1:
                raise ValueError("texts of different lengths: send one text at a time")
            data["input_ids"] = ids
            data["attention_mask"] = [[1] * len(row) for row in ids]
        return BatchFeature(data, tensor_type=return_tensors)

    def _expand(self, text: str, token_counts: list[int]) -> list[int]:
        ids: list[int] = []
        pieces = _IMAGE_TAG.split(text)  # text, number, text, number, ..., text
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids if piece else []
                continue
            number = int(piece)
            if not 1 <= number <= len(token_counts):
                raise ValueError(
                    f"<|image_{number}|> in the text, but {len(token_counts)} image(s) given"
                )
            ids += [-number] * token_counts[number - 1]
        return ids


def _to_pil(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # channels first
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return Image.fromarray(array.squeeze())


# --- Ultravox ------------------------------------------------------------------------------

AUDIO_PLACEHOLDER = "<|audio|>"
_WHISPER_CONV_STRIDE = 2  # the encoder's second conv halves the mel frames


def ultravox_num_tokens(num_mel_frames: int, stack_factor: int) -> int:
    """Tokens for one chunk: the encoder's output frames, stacked ``stack_factor`` at a time
    (Whisper's 100 mel frames a second -> 50 encoder frames -> 6.25 tokens with 8)."""
    encoder_frames = (num_mel_frames - 1) // _WHISPER_CONV_STRIDE + 1
    return math.ceil(encoder_frames / stack_factor)


class UltravoxProcessor(ProcessorMixin):
    """Whisper log-mel features per chunk of at most ``chunk_length`` seconds, and the
    ``<|audio|>`` placeholder expanded to the audio's token count in ``input_ids``."""

    audio_processor: Any  # set by ProcessorMixin from the first argument

    def __init__(
        self,
        audio_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        stack_factor: int = 8,
        audio_placeholder: str = AUDIO_PLACEHOLDER,
        **kwargs: Any,
    ) -> None:
        super().__init__(audio_processor, tokenizer, chat_template=chat_template)
        self.stack_factor = stack_factor
        self.audio_placeholder = audio_placeholder
        # vLLM sets both from the model config; these defaults serve direct use.
        self.audio_token_replacement = audio_placeholder
        self.audio_replacement_token_id = tokenizer.convert_tokens_to_ids(audio_placeholder)

    def __call__(
        self,
        text: str | list[str] | None = None,
        audios: Any = None,
        audio: Any = None,
        sampling_rate: int | None = None,
        include_audio_num_chunks: bool = False,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        audios = audios if audios is not None else audio
        if audios is not None and not isinstance(audios, (list, tuple)):
            audios = [audios]
        data: dict[str, Any] = {}
        tokens_per_audio: list[int] = []
        if audios:
            data, tokens_per_audio = self._features(audios, sampling_rate)
            if not include_audio_num_chunks:
                data.pop("audio_num_chunks")
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            ids = [self._expand(t, tokens_per_audio) for t in texts]
            data["input_ids"] = ids
            data["attention_mask"] = [[1] * len(row) for row in ids]
        return BatchFeature(data, tensor_type=return_tensors)

    def _features(
        self, audios: list[Any], sampling_rate: int | None
    ) -> tuple[dict[str, Any], list[int]]:
        extractor = self.audio_processor
        rate = sampling_rate or extractor.sampling_rate
        if rate != extractor.sampling_rate:
            raise ValueError(
                f"audio at {rate} Hz; this processor takes {extractor.sampling_rate} Hz"
            )
        chunk_samples = extractor.chunk_length * rate
        mels, lens, token_lens, num_chunks = [], [], [], []
        for samples in audios:
            samples = np.asarray(samples, np.float32).reshape(-1)
            starts = range(0, max(len(samples), 1), chunk_samples)
            for start in starts:
                chunk = samples[start : start + chunk_samples]
                if len(chunk) < extractor.n_fft:  # the STFT needs one window
                    chunk = np.pad(chunk, (0, extractor.n_fft - len(chunk)))
                mel = extractor(chunk, sampling_rate=rate, padding="longest", return_tensors="np")[
                    "input_features"
                ][0]
                mels.append(mel)
                lens.append(mel.shape[-1])
                token_lens.append(ultravox_num_tokens(mel.shape[-1], self.stack_factor))
            num_chunks.append(len(starts))
        width = max(lens)
        values = np.zeros((len(mels), mels[0].shape[0], width), np.float32)
        for i, mel in enumerate(mels):
            values[i, :, : mel.shape[-1]] = mel
        data = {
            "audio_values": values,
            "audio_lens": np.array(lens),
            "audio_token_len": np.array(token_lens),
            "audio_num_chunks": np.array(num_chunks),
        }
        tokens, at = [], 0
        for count in num_chunks:
            tokens.append(int(sum(token_lens[at : at + count])))
            at += count
        return data, tokens

    def _expand(self, text: str, tokens_per_audio: list[int]) -> list[int]:
        pieces = text.split(self.audio_placeholder)
        if len(pieces) - 1 > len(tokens_per_audio):
            raise ValueError(
                f"{len(pieces) - 1} {self.audio_placeholder} in the text, but "
                f"{len(tokens_per_audio)} audio(s) given"
            )
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids += [self.audio_replacement_token_id] * tokens_per_audio[i - 1]
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids
        return ids
