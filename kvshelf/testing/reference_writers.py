"""The writers of LMCache's multimodal page's four models (LLaVA-1.5, Phi-3.5-vision,
LLaVA-OneVision, Ultravox): each takes the language model's and the tower's sizes, so one
writer makes both the tiny CPU version and the config-only real-shape directory
(kvshelf.testing.reference_models picks the sizes)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kvshelf.testing.checkpoints import (
    Shapes,
    meta_shapes,
    pad_vocab_size,
    write_json,
)
from kvshelf.testing.tokenizer import build_tokenizer, token_id

REMOTE_CODE_FILE = "kvshelf_processors.py"
_PROCESSORS_SOURCE = Path(__file__).with_name("processors.py")
_REMOTE = REMOTE_CODE_FILE.removesuffix(".py")


def _nested_tower(prefix: str, to: str | None = None) -> list[tuple[str, str | None]]:
    """Renames that move a CLIP/SigLIP tower's tensors from ``prefix`` to ``to`` (default:
    the same) under ``vision_model.``, as published checkpoints and vLLM have them
    (transformers 5 no longer nests them)."""
    to = prefix if to is None else to
    return [(prefix + "vision_model.", to + "vision_model."), (prefix, to + "vision_model.")]


def _reserved(specials: dict[int, str], count: int) -> list[str]:
    """``count`` special tokens in id order: ``specials`` at their offsets, reserved
    names between them."""
    return [specials.get(i, f"<|reserved_special_token_{i}|>") for i in range(count)]


# --- LLaVA-1.5: CLIP ViT + Llama --------------------------------------------------------------

# LLaVA-1.5's own template renders every image before the text of its message.
_LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() }}: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def write_llava(
    out: Path, text: dict[str, Any], vision: dict[str, Any], dtype: str, real_ids: bool = False
) -> Shapes:
    """LLaVA-1.5: a CLIP tower (feature layer -2, CLS dropped: (image/patch)^2 tokens an
    image) and a Llama text model. ``real_ids`` puts ``<image>`` at 32000, as in the
    published tokenizer."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    specials = ["<image>", "<pad>", "<unk>", "<s>", "</s>"]
    tokenizer = build_tokenizer(
        special_tokens=specials,
        eos_token="</s>",
        pad_token="<pad>",
        bos_token="<s>",
        unk_token="<unk>",
        chat_template=_LLAVA_TEMPLATE,
        first_special_id=32000 if real_ids else None,
    )
    image_id = token_id(tokenizer, "<image>")
    text = {
        "vocab_size": pad_vocab_size(len(tokenizer)),
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **text,
    }
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision, hidden_act="quick_gelu"),
        text_config=LlamaConfig(**text),
        image_token_index=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        dtype=dtype,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    side = vision["image_size"]
    # CLIPImageProcessor: the torchvision one where it is installed, its PIL twin elsewhere.
    images = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        chat_template=_LLAVA_TEMPLATE,
    )
    config.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return meta_shapes(LlavaForConditionalGeneration, config, _nested_tower("model.vision_tower."))


# --- Phi-3.5-vision: CLIP ViT-L/336 with the HD transform + Phi-3 -----------------------------

_PHI3_IMAGE_ID = 32044  # hard-coded in vLLM's phi3v.py
_PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Phi-3's added tokens from id 32000, as far as a prompt uses them.
_PHI3_SPECIALS = {
    0: "<|endoftext|>",
    1: "<|assistant|>",
    6: "<|system|>",
    7: "<|end|>",
    10: "<|user|>",
    _PHI3_IMAGE_ID - 32000: "<|image|>",
}
CLIP_L_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


def write_phi3_v(
    out: Path, text: dict[str, Any], clip_layer: int, dtype: str, num_crops: int = 4
) -> Shapes:
    """Phi-3.5-vision: vLLM builds CLIP ViT-L/336 up to ``clip_layer`` (the real model:
    -2, all but the last of 24; tiny: 0, one layer); images go through the HD transform
    into at most ``num_crops`` 336-px crops plus a global view."""
    from transformers import Phi3Config

    tokenizer = build_tokenizer(
        special_tokens=_reserved(_PHI3_SPECIALS, _PHI3_IMAGE_ID - 32000 + 1),
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
        first_special_id=32000,
        chat_template=_PHI3_TEMPLATE,
    )
    if token_id(tokenizer, "<|image|>") != _PHI3_IMAGE_ID:
        raise RuntimeError(f"<|image|> must have id {_PHI3_IMAGE_ID} for vLLM's phi3v.py")
    text = {
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        **text,
    }
    vision = {
        "img_processor": {
            "image_dim_out": 1024,
            "layer_idx": clip_layer,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "type_feature": "patch",
        },
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
    }
    config = {
        **Phi3Config(**text).to_dict(),
        **vision,
        "model_type": "phi3_v",
        "dtype": dtype,
        "architectures": ["Phi3VForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{_REMOTE}.Phi3VConfig",
            "AutoProcessor": f"{_REMOTE}.Phi3VProcessor",
        },
    }
    config.pop("transformers_version", None)
    write_json(out / "config.json", config)
    _write_remote_processor(
        out,
        "Phi3VProcessor",
        {},
        {
            "image_processor_type": "Phi3VImageProcessor",
            "num_crops": num_crops,
            "auto_map": {
                "AutoImageProcessor": f"{_REMOTE}.Phi3VImageProcessor",
                "AutoProcessor": f"{_REMOTE}.Phi3VProcessor",
            },
        },
    )
    tokenizer.save_pretrained(out)
    return _phi3_v_shapes(Phi3Config(**text), clip_layer)


def _phi3_v_shapes(text: Any, clip_layer: int) -> Shapes:
    """vLLM's Phi3V tensors: a Phi-3 LM, the CLIP tower up to ``clip_layer`` and the HD
    transform's separators and projection."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3ForCausalLM

    shapes = meta_shapes(Phi3ForCausalLM, text)
    clip = CLIPVisionConfig(**{**CLIP_L_336, "num_hidden_layers": _clip_layers(clip_layer)})
    prefix = "model.vision_embed_tokens."
    # The truncated tower has no final norm.
    shapes |= meta_shapes(
        CLIPVisionModel,
        clip,
        [
            ("vision_model.post_layernorm.", None),
            ("post_layernorm.", None),
            *_nested_tower("", prefix + "img_processor."),
        ],
    )
    merged = 4 * CLIP_L_336["hidden_size"]  # 2x2 patches merged into channels
    shapes |= {
        prefix + "glb_GN": (1, 1, merged),
        prefix + "sub_GN": (1, 1, 1, merged),
        prefix + "img_projection.0.weight": (text.hidden_size, merged),
        prefix + "img_projection.0.bias": (text.hidden_size,),
        prefix + "img_projection.2.weight": (text.hidden_size, text.hidden_size),
        prefix + "img_projection.2.bias": (text.hidden_size,),
    }
    return shapes


def _clip_layers(layer_idx: int) -> int:
    return layer_idx + 1 if layer_idx >= 0 else CLIP_L_336["num_hidden_layers"] + layer_idx + 1


def _write_remote_processor(
    out: Path, processor_class: str, processor: dict[str, Any], preprocessor: dict[str, Any]
) -> None:
    """processors.py as the dir's remote code, and the configs that name its classes."""
    shutil.copyfile(_PROCESSORS_SOURCE, out / REMOTE_CODE_FILE)
    write_json(
        out / "processor_config.json",
        {
            "processor_class": processor_class,
            "auto_map": {"AutoProcessor": f"{_REMOTE}.{processor_class}"},
            **processor,
        },
    )
    write_json(out / "preprocessor_config.json", preprocessor)


# --- LLaVA-OneVision: SigLIP + Qwen2, anyres images, pooled video frames ----------------------

_ONEVISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<image>{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] in ('video', 'video_url') %}<video>{% endif %}"
    "{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'text' %}\n{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_llava_onevision(
    out: Path, text: dict[str, Any], vision: dict[str, Any], dtype: str, real_ids: bool = False
) -> Shapes:
    """LLaVA-OneVision: a SigLIP tower (all patches kept; a video frame pooled 2x2), anyres
    image grids up to 6x6 tiles (anyres_max_9) and a Qwen2 text model. ``real_ids`` puts
    ``<image>``/``<video>`` at Qwen's 151646/151647."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = build_tokenizer(
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=_ONEVISION_TEMPLATE,
        first_special_id=151643 if real_ids else None,
    )
    ids = {name: token_id(tokenizer, f"<{name}>") for name in ("image", "video")}
    text = {
        "vocab_size": pad_vocab_size(len(tokenizer)),
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **text,
    }
    side = vision["image_size"]
    pinpoints = [[side * i, side * j] for i in range(1, 7) for j in range(1, 7)]
    tower = SiglipVisionConfig(**vision)
    tower.vision_use_head = False  # not in the config class's signature
    config = LlavaOnevisionConfig(
        vision_config=tower,
        text_config=Qwen2Config(**text),
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        image_grid_pinpoints=pinpoints,
        dtype=dtype,
    )
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    images = LlavaOnevisionImageProcessor(
        size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
        do_pad=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    images.save_pretrained(out)
    # The video processor needs torchvision to be built, not to be described.
    write_json(
        out / "video_preprocessor_config.json",
        {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "size": {"height": side, "width": side},
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
            "processor_class": "LlavaOnevisionProcessor",
        },
    )
    write_json(
        out / "processor_config.json",
        {
            "processor_class": "LlavaOnevisionProcessor",
            "image_token": "<image>",
            "video_token": "<video>",
            "num_image_tokens": (side // vision["patch_size"]) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        },
    )
    return meta_shapes(
        LlavaOnevisionForConditionalGeneration, config, _nested_tower("model.vision_tower.")
    )


# --- Ultravox: Whisper encoder + stacked-frame projector + Llama ------------------------------

_ULTRAVOX_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_LLAMA3_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "<|eot_id|>",
}


def write_ultravox(
    out: Path,
    text: dict[str, Any],
    audio: dict[str, Any],
    dtype: str,
    projector_size: int,
    real_ids: bool = False,
) -> Shapes:
    """Ultravox v0.5: a Whisper encoder (128 mel bins), 8 encoder frames stacked per token
    (6.25 tokens a second), a SwiGLU projector and a Llama text model. No ``text_model_id`` /
    ``audio_model_id``: nothing is fetched. ``real_ids`` puts Llama 3's specials at 128000
    and ``<|audio|>`` at 128256, past the text model's vocabulary."""
    from transformers import WhisperFeatureExtractor

    specials = _reserved(_LLAMA3_SPECIALS, 256 if real_ids else 10) + ["<|audio|>"]
    tokenizer = build_tokenizer(
        special_tokens=specials,
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        bos_token="<|begin_of_text|>",
        chat_template=_ULTRAVOX_TEMPLATE,
        first_special_id=128000 if real_ids else None,
    )
    audio_id = token_id(tokenizer, "<|audio|>")
    vocab = 128256 if real_ids else pad_vocab_size(len(tokenizer))
    text = {
        "model_type": "llama",
        "vocab_size": vocab,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **text,
    }
    whisper = {"model_type": "whisper", "num_mel_bins": 128, "max_source_positions": 1500, **audio}
    config = {
        "architectures": ["UltravoxModel"],
        "model_type": "ultravox",
        "dtype": dtype,
        "text_config": text,
        "audio_config": whisper,
        "text_model_id": None,
        "audio_model_id": None,
        "audio_token_index": audio_id,
        "vocab_size": vocab,
        "hidden_size": projector_size,
        "stack_factor": 8,
        "projector_act": "swiglu",
        "projector_ln_mid": True,
        "norm_init": 0.4,
        "ignore_index": -100,
    }
    write_json(out / "config.json", config)
    features = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    )
    features.save_pretrained(out)
    shutil.copyfile(_PROCESSORS_SOURCE, out / REMOTE_CODE_FILE)
    write_json(
        out / "processor_config.json",
        {
            "processor_class": "UltravoxProcessor",
            "stack_factor": 8,
            "auto_map": {"AutoProcessor": f"{_REMOTE}.UltravoxProcessor"},
        },
    )
    tokenizer.save_pretrained(out)
    return _ultravox_shapes(text, whisper, projector_size)


def _ultravox_shapes(text: dict[str, Any], whisper: dict[str, Any], projector_size: int) -> Shapes:
    """vLLM's Ultravox tensors: a Llama LM, a Whisper encoder and the stacked-frame
    projector."""
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    llama = LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"})
    shapes = meta_shapes(LlamaForCausalLM, llama, [("lm_head.", None), ("", "language_model.")])
    whisper_config = WhisperConfig(**{k: v for k, v in whisper.items() if k != "model_type"})
    shapes |= meta_shapes(WhisperEncoder, whisper_config, [("", "audio_tower.")])
    stacked = 8 * whisper["d_model"]
    prefix = "multi_modal_projector."
    shapes |= {
        prefix + "ln_pre.weight": (stacked,),
        prefix + "linear_1.weight": (projector_size, stacked),
        prefix + "ln_mid.weight": (projector_size // 2,),
        prefix + "linear_2.weight": (text["hidden_size"], projector_size // 2),
    }
    return shapes
