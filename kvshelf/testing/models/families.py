"""What kvshelf.testing.models builds: each family's modalities, request types, serve flags,
weight scale and writer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kvshelf.testing import reference_models as reference
from kvshelf.testing.checkpoints import Shapes, SizePreset
from kvshelf.testing.models import hybrid, multimodal, ovis

# Modalities each family accepts, in the names vLLM uses.
FAMILY_MODALITIES: dict[str, tuple[str, ...]] = {
    "qwen2_audio": ("audio",),
    "idefics3": ("image",),
    "ovis2_5": ("image", "video"),
    # Hybrid KV caches, text only: sliding window + global attention; Mamba2 + attention;
    # Gated-DeltaNet linear attention + attention (vLLM's module needs torchvision).
    "gemma3": (),
    "granite_hybrid": (),
    "qwen3_5": (),
    "gemma3_mm": ("image",),  # Gemma 3 with its SigLIP vision tower
    # LMCache's multimodal page: LLaVA-1.5, Phi-3.5-vision, LLaVA-OneVision, Ultravox.
    **reference.MODALITIES,
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_MODALITIES)

# Request types (see kvshelf.testing.requests) each family serves, text-only included.
FAMILY_REQUEST_TYPES: dict[str, tuple[str, ...]] = {
    "qwen2_audio": ("text-only", "audio"),
    "idefics3": ("text-only", "single-image", "multi-image"),
    "ovis2_5": ("text-only", "single-image", "multi-image", "video"),
    "gemma3": ("text-only",),
    "granite_hybrid": ("text-only",),
    "qwen3_5": ("text-only",),
    "gemma3_mm": ("text-only", "single-image", "multi-image"),
    **reference.REQUEST_TYPES,
}

# Extra `vllm serve` flags each family needs.
SERVE_ARGS: dict[str, tuple[str, ...]] = {
    "qwen2_audio": (),
    "idefics3": (),
    "gemma3": (),
    "granite_hybrid": (),
    "qwen3_5": (),
    "gemma3_mm": (),
    "ovis2_5": ovis.SERVE_ARGS,
    **reference.SERVE_ARGS,  # the page's flags
}

# Families whose outputs must show what a layer's past holds: with std 0.02 each layer adds
# so little to the residual stream that the last token's embedding decides the logits,
# and a wrong recurrent state or window would go unseen. Larger weights make every
# layer count (checked: a zeroed state then changes the first token's logprobs).
FAMILY_INIT_STD = {"gemma3": 0.1, "gemma3_mm": 0.1, "granite_hybrid": 0.1, "qwen3_5": 0.1}

# Each writer writes config, tokenizer and processor files and returns the checkpoint's shapes.
WRITERS: dict[str, Callable[[Path, SizePreset, str], Shapes]] = {
    "qwen2_audio": multimodal.write_qwen2_audio,
    "idefics3": multimodal.write_idefics3,
    "ovis2_5": ovis.write_ovis2_5,
    "gemma3": hybrid.write_gemma3,
    "granite_hybrid": hybrid.write_granite_hybrid,
    "qwen3_5": hybrid.write_qwen3_5,
    "gemma3_mm": hybrid.write_gemma3_mm,
    **reference.tiny_writers(),
}
