"""The four models of LMCache's multimodal page, built offline: LLaVA-1.5 (one image),
Phi-3.5-vision (two images), LLaVA-OneVision (video) and Ultravox (audio).

Each writer takes the language model's and the tower's sizes, so one writer makes both the
tiny CPU version (``build_model(family, ...)``: an LM of a size preset, tiny towers, random
weights) and a config-only directory at the real model's shapes for the GPU host
(``write_real_shape``; served with ``--load-format dummy``). Tokenizers are trained
locally; where vLLM or the model hard-codes token ids, the special tokens sit at the real
ids. The writers are in kvshelf.testing.reference_writers.

What each needs to serve:

- ``phi3_v`` and ``ultravox``: ``--trust-remote-code``, for the processors (and Phi-3.5's
  config class) in ``processors.py``, copied into the model dir and named in ``auto_map``.
  vLLM's Phi-3.5-vision builds the CLIP ViT-L/336 tower whatever the config says; the tiny
  version keeps one of its layers (``layer_idx`` 0).
- ``llava`` and ``llava_onevision``: torchvision, which vLLM's module imports (and
  OneVision's video processor uses); on CPU see scripts/torchvision-cpu.sh.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvshelf.testing.checkpoints import Shapes, SizePreset
from kvshelf.testing.reference_writers import (
    CLIP_L_336,
    write_llava,
    write_llava_onevision,
    write_phi3_v,
    write_ultravox,
)

REFERENCE_FAMILIES: tuple[str, ...] = ("llava", "phi3_v", "llava_onevision", "ultravox")
# The model each family stands in for, as the page names it.
REFERENCE_MODELS: dict[str, str] = {
    "llava": "llava-hf/llava-1.5-7b-hf",
    "phi3_v": "microsoft/Phi-3.5-vision-instruct",
    "llava_onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "ultravox": "fixie-ai/ultravox-v0_5-llama-3_2-1b",
}
MODALITIES: dict[str, tuple[str, ...]] = {
    "llava": ("image",),
    "phi3_v": ("image",),
    "llava_onevision": ("image", "video"),
    "ultravox": ("audio",),
}
REQUEST_TYPES: dict[str, tuple[str, ...]] = {
    "llava": ("text-only", "single-image", "multi-image"),
    "phi3_v": ("text-only", "single-image", "multi-image"),
    "llava_onevision": ("text-only", "single-image", "multi-image", "video"),
    "ultravox": ("text-only", "audio"),
}
# The page's chat type for each model.
PAGE_CHAT_TYPE: dict[str, str] = {
    "llava": "single-image",
    "phi3_v": "multi-image",
    "llava_onevision": "video",
    "ultravox": "audio",
}
# The page's serve flags, verbatim.
SERVE_ARGS: dict[str, tuple[str, ...]] = {
    "llava": (),
    "phi3_v": (
        "--trust-remote-code",
        "--max-model-len",
        "4096",
        "--limit-mm-per-prompt",
        '{"image":2}',
    ),
    "llava_onevision": (),
    "ultravox": ("--max-model-len", "4096", "--trust-remote-code"),
}
NEEDS_TORCHVISION: tuple[str, ...] = ("llava", "llava_onevision")


# Tiny towers; the real ones are in REAL_SHAPES.
_TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 112,
    "patch_size": 14,
}
_TINY_WHISPER = {
    "d_model": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
}


# --- Registry -----------------------------------------------------------------------------------


def tiny_writers() -> dict[str, Callable[[Path, SizePreset, str], Shapes]]:
    """build_model's writer for each family: an LM of the preset, tiny towers."""
    return {
        "llava": lambda out, preset, dtype: write_llava(
            out, preset.text_sizes(), _TINY_VISION, dtype
        ),
        "phi3_v": lambda out, preset, dtype: write_phi3_v(
            out, preset.text_sizes(), clip_layer=0, dtype=dtype
        ),
        "llava_onevision": lambda out, preset, dtype: write_llava_onevision(
            out, preset.text_sizes(), _TINY_VISION, dtype
        ),
        "ultravox": lambda out, preset, dtype: write_ultravox(
            out, preset.text_sizes(), _TINY_WHISPER, dtype, projector_size=256
        ),
    }


# The published models' shapes (config.json of each hub repo).
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "llava": {
        "text": {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32064,
        },
        "vision": {k: v for k, v in CLIP_L_336.items() if k != "hidden_act"},
    },
    "phi3_v": {
        "text": {
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 131072,
        }
    },
    "llava_onevision": {
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152128,
        },
        "vision": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 26,
            "num_attention_heads": 16,
            "image_size": 384,
            "patch_size": 14,
        },
    },
    "ultravox": {
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
        },
        # whisper-large-v3-turbo's encoder
        "audio": {
            "d_model": 1280,
            "encoder_layers": 32,
            "encoder_attention_heads": 20,
            "encoder_ffn_dim": 5120,
        },
    },
}


def write_real_shape(family: str, out: Path, dtype: str = "bfloat16") -> Path:
    """A config-only dir at the published model's shapes (serve with ``--load-format
    dummy``): compute and KV bytes of the real model, random outputs."""
    if family not in REAL_SHAPES:
        raise ValueError(f"unknown family {family!r}; choose one of {list(REAL_SHAPES)}")
    out.mkdir(parents=True, exist_ok=True)
    shape = REAL_SHAPES[family]
    if family == "llava":
        write_llava(out, shape["text"], shape["vision"], dtype, real_ids=True)
    elif family == "phi3_v":
        write_phi3_v(out, shape["text"], clip_layer=-2, dtype=dtype)
    elif family == "llava_onevision":
        write_llava_onevision(out, shape["text"], shape["vision"], dtype, real_ids=True)
    else:
        write_ultravox(
            out, shape["text"], shape["audio"], dtype, projector_size=4096, real_ids=True
        )
    return out
