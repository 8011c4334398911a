"""Tiny multimodal model directories that vLLM (CPU build) serves offline.

Each directory holds a config, a locally trained tokenizer and processor configs and, by
default, a `model.safetensors` of seeded random weights (normal, std 0.02; norms at 1; see
kvshelf.testing.checkpoints for why not vLLM's dummy weights). `dummy_weights=True` still
builds a config-only dir (no weight file; served with `--load-format dummy`) for benchmarks
and start-up tests, where the outputs do not matter. The four models of LMCache's
multimodal page (LLaVA-1.5, Phi-3.5-vision, LLaVA-OneVision, Ultravox) are written by
kvshelf.testing.reference_models.

`build_model` writes into a temporary sibling directory and renames it into place after
writing a marker file last, so a directory that has the marker is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kvshelf.testing import reference_models as reference
from kvshelf.testing.checkpoints import (
    INIT_STD,
    SIZES,
    Shapes,
    SizePreset,
    meta_shapes,
    pad_vocab_size,
    write_json,
    write_random_checkpoint,
)
from kvshelf.testing.tokenizer import build_tokenizer

MARKER_NAME = "kvshelf_build.json"
# Bump when the files a builder writes change, so old directories get rebuilt.
BUILD_FORMAT_VERSION = 3

DTYPES: tuple[str, ...] = ("bfloat16", "float32")  # both verified on the CPU backend


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

# Ovis2.5 profiles with 1792x1792 dummy images (3,136 tokens each) and as many video frames as
# fit; smaller dummy items keep profiling inside a 4K context. Capping the frames sampled from a
# real video (media-io num_frames) makes the 16-frame test clip cost 394 tokens. A request may
# carry at most 4 images and 1 video.
_OVIS_LIMIT_MM = {
    "image": {"count": 4, "width": 448, "height": 448},
    "video": {"count": 1, "num_frames": 8, "width": 448, "height": 448},
}
_OVIS_MEDIA_IO = {"video": {"num_frames": 8}}

_SERVE_ARGS: dict[str, tuple[str, ...]] = {
    "qwen2_audio": (),
    "idefics3": (),
    "gemma3": (),
    "granite_hybrid": (),
    "qwen3_5": (),
    "gemma3_mm": (),
    "ovis2_5": (
        # The config class is a local Python file in the model dir (see ovis/).
        "--trust-remote-code",
        "--limit-mm-per-prompt",
        json.dumps(_OVIS_LIMIT_MM),
        "--media-io-kwargs",
        json.dumps(_OVIS_MEDIA_IO),
    ),
    **reference.SERVE_ARGS,  # the page's flags
}

WEIGHTS_FILE = "model.safetensors"
# Families whose outputs must show what a layer's past holds: with std 0.02 each layer adds
# so little to the residual stream that the last token's embedding decides the logits,
# and a wrong recurrent state or window would go unseen. Larger weights make every
# layer count (checked: a zeroed state then changes the first token's logprobs).
_FAMILY_INIT_STD = {"gemma3": 0.1, "gemma3_mm": 0.1, "granite_hybrid": 0.1, "qwen3_5": 0.1}


def serve_args(family: str, *, dtype: str | None = None, dummy_weights: bool = False) -> list[str]:
    """Extra `vllm serve` arguments a model dir of `family` needs (model path not included).

    `dummy_weights` must match the build. With `dtype`, adds `--dtype`; without it vLLM uses
    the dtype written in config.json.
    """
    _check_family(family)
    args = list(_SERVE_ARGS[family])
    if dummy_weights:
        args += ["--load-format", "dummy"]
    if dtype is not None:
        _check_dtype(dtype)
        args += ["--dtype", dtype]
    return args


def build_model(
    family: str,
    out_dir: str | os.PathLike[str],
    size: str = "m",
    *,
    dtype: str = "bfloat16",
    dummy_weights: bool = False,
) -> Path:
    """Build (or reuse) a tiny random-weight `family` model in `out_dir`; returns its path.

    `dtype` is the default serving dtype written to config.json (weights are stored as
    bfloat16 either way, so a dir serves the same values in any dtype). Fast when `out_dir`
    already holds a complete build with the same parameters. A directory with another build's
    marker is rebuilt; one without a marker is replaced only if it holds no subdirectories.
    """
    _check_family(family)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    _check_dtype(dtype)
    out = Path(out_dir).resolve()
    params = _build_params(family, size, dtype, dummy_weights)
    if _read_marker(out) == params:
        return out
    if out.exists():
        _check_replaceable(out)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        checkpoint_shapes = _WRITERS[family](tmp, SIZES[size], dtype)
        if not dummy_weights:
            std = _FAMILY_INIT_STD.get(family, INIT_STD)
            write_random_checkpoint(tmp / WEIGHTS_FILE, checkpoint_shapes, std)
        write_json(tmp / MARKER_NAME, params)
        _move_into_place(tmp, out, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_build_info(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of a complete build (family, size, dtype, serve_args, ...), else None."""
    return _read_marker(Path(model_dir))


def _check_family(family: str) -> None:
    if family not in FAMILY_MODALITIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {list(FAMILIES)}")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")


def _build_params(family: str, size: str, dtype: str, dummy_weights: bool) -> dict[str, Any]:
    return {
        "format_version": BUILD_FORMAT_VERSION,
        "family": family,
        "size": size,
        "dtype": dtype,
        "dummy_weights": dummy_weights,
        "preset": asdict(SIZES[size]),
        "serve_args": serve_args(family, dummy_weights=dummy_weights),
    }


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MARKER_NAME).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _check_replaceable(out: Path) -> None:
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; pick another output path")
    if (out / MARKER_NAME).exists():
        return
    subdirs = [p.name for p in out.iterdir() if p.is_dir()]
    if subdirs:
        raise FileExistsError(
            f"{out} has no {MARKER_NAME} and contains directories {subdirs[:3]}; it does not "
            "look like a model dir built here. Remove it or pick another output path."
        )


def _move_into_place(tmp: Path, out: Path, params: dict[str, Any]) -> None:
    if out.exists():
        # Another process may have finished the same build meanwhile; keep its copy.
        if _read_marker(out) == params:
            return
        shutil.rmtree(out)
    os.replace(tmp, out)


# --- Qwen2-Audio: Qwen2 LM + Whisper-style audio encoder --------------------------------------


def _write_qwen2_audio(out: Path, preset: SizePreset, dtype: str) -> Shapes:
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        WhisperFeatureExtractor,
    )

    tokenizer = build_tokenizer(
        special_tokens=[
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|AUDIO|>",
            "<|audio_bos|>",
            "<|audio_eos|>",
        ],
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    audio_token_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    # 128 mel bins at 16 kHz, as in Qwen2-Audio-7B; vLLM resamples audio to 16 kHz.
    features = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    )
    # The processor's default chat template is Qwen2-Audio's ChatML one.
    processor = Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer)
    encoder = Qwen2AudioEncoderConfig(
        num_mel_bins=128,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        d_model=64,
        max_source_positions=1500,
    )
    text = Qwen2Config(
        vocab_size=pad_vocab_size(len(tokenizer)),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Qwen2AudioConfig(
        audio_config=encoder, text_config=text, audio_token_index=audio_token_id, dtype=dtype
    )
    # A config saved without a model has no architectures, and vLLM would pick its pooling
    # runner (no chat endpoint).
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    config.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Published layout: audio_tower.*, multi_modal_projector.*, language_model.model.*; the
    # LM head is tied to the embeddings.
    return meta_shapes(
        Qwen2AudioForConditionalGeneration,
        config,
        [
            ("lm_head.", None),
            ("model.language_model.", "language_model.model."),
            ("model.", ""),
        ],
    )


# --- Idefics3: Llama LM + SigLIP vision tower, images split into tiles ------------------------

_IDEFICS3_TILE_PX = 112  # vision image_size; a 224 px longest edge gives 2x2 tiles + global
_IDEFICS3_PATCH_PX = 14
_IDEFICS3_SCALE = 2  # pixel-shuffle factor: 64 patches per tile -> 16 tokens

# SmolVLM/Idefics3 style: an image item becomes a literal "<image>", which the processor expands.
_IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _write_idefics3(out: Path, preset: SizePreset, dtype: str) -> Shapes:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    # The PIL image processor: the default one needs torchvision, which is not installed.
    tile_tokens = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = build_tokenizer(
        special_tokens=[
            "<unk>",
            "<|begin_of_text|>",
            "<end_of_utterance>",
            "<pad>",
            "<fake_token_around_image>",
            "<image>",
            "<global-img>",
            *tile_tokens,
        ],
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        bos_token="<|begin_of_text|>",
        unk_token="<unk>",
        chat_template=_IDEFICS3_CHAT_TEMPLATE,
    )
    image_seq_len = (_IDEFICS3_TILE_PX // _IDEFICS3_PATCH_PX) ** 2 // _IDEFICS3_SCALE**2
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * _IDEFICS3_TILE_PX},
        max_image_size={"longest_edge": _IDEFICS3_TILE_PX},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=_IDEFICS3_CHAT_TEMPLATE,
    )
    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_IDEFICS3_TILE_PX,
        patch_size=_IDEFICS3_PATCH_PX,
    )
    text = LlamaConfig(
        vocab_size=pad_vocab_size(len(tokenizer)),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=_IDEFICS3_SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]  # see _write_qwen2_audio
    # save_pretrained warns "pad_token_id ... got 128002": that is transformers' default
    # Idefics3Config, built to diff against; this config's ids are valid.
    config.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return meta_shapes(Idefics3ForConditionalGeneration, config)  # untied LM head


# --- Ovis2.5: Qwen3 LM + SigLIP2-NaViT visual tokenizer (config class is remote code) ----------

# vLLM's ovis2_5.py hard-codes Qwen token ids (<|image_pad|> = 151655, indicators from
# 151672), so the specials must sit at Qwen's ids: Qwen's 26 specials from 151643, then Ovis's.
_QWEN_FIRST_SPECIAL_ID = 151643
_QWEN_VOCAB_SIZE = 151936
_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
_OVIS_SPECIALS = [
    "<image>",
    "<video>",
    "<ovis_visual_atom>",
    "<ovis_image_start>",
    "<ovis_image_end>",
    "<ovis_video_start>",
    "<ovis_video_end>",
]
_OVIS_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image>\n"
    "{% elif c['type'] == 'video' or c['type'] == 'video_url' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_OVIS_CONFIG_FILE = Path(__file__).parent / "ovis" / "configuration_ovis2_5.py"


def _write_ovis2_5(out: Path, preset: SizePreset, dtype: str) -> Shapes:
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = build_tokenizer(
        special_tokens=_QWEN_SPECIALS + _OVIS_SPECIALS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        first_special_id=_QWEN_FIRST_SPECIAL_ID,
        chat_template=_OVIS_CHAT_TEMPLATE,
    )
    for token, token_id in (("<|image_pad|>", 151655), ("<ovis_image_start>", 151672)):
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"{token} must have id {token_id} for vLLM's Ovis2.5")
    tokenizer.save_pretrained(out)
    # vLLM's own Ovis2_5Processor resizes images and then calls the image processor with an
    # explicit {height, width}; it only needs to normalise.
    SiglipImageProcessorPil(
        size={"height": 448, "width": 448}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out)
    llm_config = {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": _QWEN_VOCAB_SIZE,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_heads,
        "num_key_value_heads": preset.num_kv_heads,
        "head_dim": preset.head_dim,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": dtype,
    }
    vit_config = {
        "model_type": "siglip2_navit",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_channels": 3,
        "num_patches": -1,
        # 32 px patches, stride 2: a 448x448 image or frame becomes 7x7 = 49 tokens.
        "image_size": 512,
        "patch_size": 32,
        "hidden_stride": 2,
        "window_size": 112,
        "fullatt_block_indexes": None,
        "temporal_patch_size": 1,
        "preserve_original_pe": True,
        "use_rope": True,
        "hidden_act": "gelu_pytorch_tanh",
    }
    config = {
        "architectures": ["Ovis2_5"],
        "model_type": "ovis2_5",
        "auto_map": {"AutoConfig": "configuration_ovis2_5.Ovis2_5_Config"},
        # The visual head predicts visual_vocab_size - 4 classes plus 4 indicator tokens.
        "hidden_size": preset.hidden_size,
        "visual_vocab_size": 516,
        "dtype": dtype,
        "llm_config": llm_config,
        "vit_config": vit_config,
    }
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {"bos_token_id": 151643, "eos_token_id": 151645})
    shutil.copyfile(_OVIS_CONFIG_FILE, out / _OVIS_CONFIG_FILE.name)
    return _ovis2_5_shapes(llm_config, vit_config, config["visual_vocab_size"])


def _ovis2_5_shapes(
    llm_config: dict[str, Any], vit_config: dict[str, Any], visual_vocab_size: int
) -> Shapes:
    """vLLM's Ovis2_5 tensors: a Qwen3 LM, a SigLIP-shaped ViT and the visual head/embedding.

    There is no transformers class for Ovis2.5; its ViT has SigLIP's tensors (vLLM's
    Siglip2Navit stacks q/k/v itself), so the shapes come from those two classes.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    skip = {
        "model_type",
        "architectures",
        "hidden_stride",
        "window_size",
        "fullatt_block_indexes",
        "temporal_patch_size",
        "preserve_original_pe",
        "use_rope",
        "num_patches",
    }
    llm = Qwen3Config(**{k: v for k, v in llm_config.items() if k not in skip})
    vit = SiglipVisionConfig(
        **{k: v for k, v in vit_config.items() if k not in skip}, vision_use_head=False
    )
    shapes = meta_shapes(Qwen3ForCausalLM, llm, [("lm_head.", None), ("model.", "llm.model.")])
    vit_prefix = "visual_tokenizer.vit.vision_model."
    shapes |= meta_shapes(SiglipVisionModel, vit, [("vision_model.", vit_prefix), ("", vit_prefix)])
    head_size = visual_vocab_size - 4  # the last 4 visual tokens are the indicators
    vit_out = vit_config["hidden_size"] * vit_config["hidden_stride"] ** 2
    shapes["visual_tokenizer.head.0.weight"] = (head_size, vit_out)
    shapes["visual_tokenizer.head.1.weight"] = (head_size,)
    shapes["visual_tokenizer.head.1.bias"] = (head_size,)
    shapes["vte.weight"] = (visual_vocab_size, llm_config["hidden_size"])
    return shapes


# --- Hybrid KV caches (text) --------------------------------------------------------------------

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


def _write_gemma3(out: Path, preset: SizePreset, dtype: str) -> Shapes:
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


def _write_gemma3_mm(out: Path, preset: SizePreset, dtype: str) -> Shapes:
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

    names = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tokenizer = build_tokenizer(
        # vLLM merges the newlines around an image as Gemma's vocabulary does: runs of
        # one to four newlines are single tokens there.
        special_tokens=[
            "<pad>",
            "<eos>",
            "<bos>",
            "<start_of_turn>",
            "<end_of_turn>",
            *names.values(),
            "\n",
            "\n\n",
            "\n\n\n",
            "\n\n\n\n",
        ],
        eos_token="<eos>",
        pad_token="<pad>",
        bos_token="<bos>",
        chat_template=_GEMMA3_MM_TEMPLATE,
        named_tokens=names,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in names.items()}
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


def _write_granite_hybrid(out: Path, preset: SizePreset, dtype: str) -> Shapes:
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


def _write_qwen3_5(out: Path, preset: SizePreset, dtype: str) -> Shapes:
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
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
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
        **ids,
    )
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    config.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


# Each writer writes config, tokenizer and processor files and returns the checkpoint's shapes.
_WRITERS: dict[str, Callable[[Path, SizePreset, str], Shapes]] = {
    "qwen2_audio": _write_qwen2_audio,
    "idefics3": _write_idefics3,
    "ovis2_5": _write_ovis2_5,
    "gemma3": _write_gemma3,
    "granite_hybrid": _write_granite_hybrid,
    "qwen3_5": _write_qwen3_5,
    "gemma3_mm": _write_gemma3_mm,
    **reference.tiny_writers(),
}
