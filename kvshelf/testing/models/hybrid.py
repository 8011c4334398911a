"""Hybrid KV caches: Gemma 3 (sliding window + global attention, text and with its vision
tower), Granite 4.0-H (Mamba2 + attention) and Qwen3.5 (Gated-DeltaNet + attention; with its
vision tower config-only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvshelf.testing.checkpoints import Shapes, SizePreset, meta_shapes, pad_vocab_size
from kvshelf.testing.tokenizer import build_tokenizer, token_id

_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SLIDING_WINDOW = 64  # tokens: far below the test prompts, so the window really slides


def chatml_tokenizer():
    return build_tokenizer(
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=_CHATML_TEMPLATE,
    )


def _common_text(tokenizer, preset: SizePreset, dtype: str) -> dict[str, Any]:
    return {
        "vocab_size": pad_vocab_size(len(tokenizer)),
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_attention_heads": preset.num_heads,
        "num_key_value_heads": preset.num_kv_heads,
        "max_position_embeddings": 8192,
        "dtype": dtype,
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _alternating(num_layers: int, local: str, other: str) -> list[str]:
    """At least 4 layers, every second one ``other`` (so each kind has several)."""
    return [other if i % 2 else local for i in range(max(4, num_layers))]


def _save_text_model(out: Path, config: Any, tokenizer, model_class: Any) -> Shapes:
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return meta_shapes(
        model_class, config, [("lm_head.", None)] if config.tie_word_embeddings else ()
    )


def write_gemma3_text(out: Path, text: dict[str, Any], dtype: str, weights: bool = True) -> Shapes:
    """Gemma 3's text model: sliding-window layers with a global one every
    ``sliding_window_pattern``-th layer; ``text`` sets the sizes."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = chatml_tokenizer()
    text = dict(text)
    every = text.pop("sliding_window_pattern", 2)
    num_layers = text.pop("num_hidden_layers")
    layers = [
        "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers)
    ]
    common = {
        "vocab_size": pad_vocab_size(len(tokenizer)),
        "max_position_embeddings": 40960,
        "dtype": dtype,
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Gemma3TextConfig(
        **common, **text, num_hidden_layers=num_layers, layer_types=layers, tie_word_embeddings=True
    )
    config.architectures = ["Gemma3ForCausalLM"]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return meta_shapes(Gemma3ForCausalLM, config, [("lm_head.", None)]) if weights else {}


def write_gemma3(out: Path, preset: SizePreset, dtype: str) -> Shapes:
    """Gemma 3 text: sliding-window layers with a global one every 2nd layer here."""
    return write_gemma3_text(
        out,
        {
            "hidden_size": preset.hidden_size,
            "intermediate_size": preset.intermediate_size,
            "num_attention_heads": preset.num_heads,
            "num_key_value_heads": preset.num_kv_heads,
            "head_dim": preset.head_dim,
            "num_hidden_layers": max(4, preset.num_layers),
            "sliding_window": _SLIDING_WINDOW,
        },
        dtype,
    )


_GEMMA3_IMAGE_PX = 112  # 8x8 patches of 14 px, pooled to 4x4 = 16 tokens an image
_GEMMA3_MM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


_GEMMA3_MM_NAMES = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
_GEMMA3_MM_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    *_GEMMA3_MM_NAMES.values(),
    # vLLM merges the newlines around an image as Gemma's vocabulary does: runs of
    # one to four newlines are single tokens there.
    "\n",
    "\n\n",
    "\n\n\n",
    "\n\n\n\n",
]


def write_gemma3_mm(out: Path, preset: SizePreset, dtype: str) -> Shapes:
    """Gemma 3 with its SigLIP tower (``Gemma3ForConditionalGeneration``): the text model
    of ``gemma3``; each image becomes 16 soft tokens between <start_of_image> and
    <end_of_image>."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tokenizer = build_tokenizer(
        special_tokens=_GEMMA3_MM_SPECIALS,
        eos_token="<eos>",
        pad_token="<pad>",
        bos_token="<bos>",
        chat_template=_GEMMA3_MM_TEMPLATE,
        named_tokens=_GEMMA3_MM_NAMES,
    )
    ids = {name: token_id(tokenizer, tok) for name, tok in _GEMMA3_MM_NAMES.items()}
    layers = _alternating(preset.num_layers, "sliding_attention", "full_attention")
    text = Gemma3TextConfig(
        **_common_text(tokenizer, preset, dtype),
        head_dim=preset.head_dim,
        num_hidden_layers=len(layers),
        layer_types=layers,
        sliding_window=_SLIDING_WINDOW,
    )
    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_GEMMA3_IMAGE_PX,
        patch_size=14,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
        dtype=dtype,
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    images = Gemma3ImageProcessorPil(
        size={"height": _GEMMA3_IMAGE_PX, "width": _GEMMA3_IMAGE_PX},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = Gemma3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        chat_template=_GEMMA3_MM_TEMPLATE,
        image_seq_length=16,
    )
    config.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Published checkpoints nest the tower as SigLIP's vision_model; transformers 5 does not.
    return meta_shapes(
        Gemma3ForConditionalGeneration,
        config,
        [("lm_head.", None), ("model.vision_tower.", "model.vision_tower.vision_model.")],
    )


def write_granite_hybrid(out: Path, preset: SizePreset, dtype: str) -> Shapes:
    """Granite 4.0-H shape: Mamba2 layers with attention every 2nd layer, dense MLPs."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    tokenizer = chatml_tokenizer()
    layers = _alternating(preset.num_layers, "mamba", "attention")
    config = GraniteMoeHybridConfig(
        **_common_text(tokenizer, preset, dtype),
        shared_intermediate_size=preset.intermediate_size,
        num_local_experts=0,
        num_experts_per_tok=0,
        num_hidden_layers=len(layers),
        layer_types=layers,
        mamba_n_heads=8,
        mamba_d_head=preset.hidden_size * 2 // 8,
        mamba_n_groups=1,
        mamba_d_state=64,
        mamba_d_conv=4,
        mamba_expand=2,
        position_embedding_type="rope",
        tie_word_embeddings=True,
    )
    config.architectures = ["GraniteMoeHybridForCausalLM"]
    return _save_text_model(out, config, tokenizer, GraniteMoeHybridForCausalLM)


def write_qwen3_5(out: Path, preset: SizePreset, dtype: str) -> Shapes:
    """Qwen3.5 text: Gated-DeltaNet linear attention with full attention every 2nd layer.
    The CPU kernel wants linear head dims of 64 or 128 (not 32) and bfloat16."""
    from transformers import Qwen3_5ForCausalLM
    from transformers.models.qwen3_5 import Qwen3_5TextConfig

    tokenizer = chatml_tokenizer()
    layers = _alternating(preset.num_layers, "linear_attention", "full_attention")
    config = Qwen3_5TextConfig(
        **_common_text(tokenizer, preset, dtype),
        head_dim=max(64, preset.head_dim),
        num_hidden_layers=len(layers),
        layer_types=layers,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        tie_word_embeddings=True,
    )
    config.architectures = ["Qwen3_5ForCausalLM"]
    return _save_text_model(out, config, tokenizer, Qwen3_5ForCausalLM)


_QWEN_VL_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_qwen3_5_vl(out: Path, text: dict[str, Any], vision: dict[str, Any], dtype: str) -> None:
    """A config-only Qwen3.5 dir with its vision tower (``Qwen3_5ForConditionalGeneration``,
    the class vLLM serves Qwen3.5 with; served with ``--load-format dummy``): ``text`` and
    ``vision`` override the config's sizes. The processor is Qwen3-VL's (16 px patches
    merged 2x2: a 224 px image is 49 tokens); it needs torchvision."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
    from transformers.models.qwen3_5 import Qwen3_5Config

    tokenizer = build_tokenizer(
        special_tokens=_QWEN_VL_SPECIALS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=_QWEN_VL_TEMPLATE,
    )
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=16, merge_size=2),
        video_processor=Qwen3VLVideoProcessor(size=pixels, patch_size=16, merge_size=2),
        tokenizer=tokenizer,
        chat_template=_QWEN_VL_TEMPLATE,
    )
    text_config = dict(
        vocab_size=pad_vocab_size(len(tokenizer)),
        max_position_embeddings=40960,
        dtype=dtype,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **text,
    )
    vision_config = dict(
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text["hidden_size"],
        **vision,
    )
    config = Qwen3_5Config(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=True,
        dtype=dtype,
        image_token_id=token_id(tokenizer, "<|image_pad|>"),
        video_token_id=token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=token_id(tokenizer, "<|vision_end|>"),
    )
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    config.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
