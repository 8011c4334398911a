"""Ovis2.5: a Qwen3 LM and a SigLIP2-NaViT visual tokenizer; its config class is remote code
(``kvshelf/testing/ovis/``), copied into the model dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kvshelf.testing.checkpoints import Shapes, SizePreset, meta_shapes, write_json
from kvshelf.testing.tokenizer import build_tokenizer

# Ovis2.5 profiles with 1792x1792 dummy images (3,136 tokens each) and as many video frames as
# fit; smaller dummy items keep profiling inside a 4K context. Capping the frames sampled from a
# real video (media-io num_frames) makes the 16-frame test clip cost 394 tokens. A request may
# carry at most 4 images and 1 video.
_LIMIT_MM = {
    "image": {"count": 4, "width": 448, "height": 448},
    "video": {"count": 1, "num_frames": 8, "width": 448, "height": 448},
}
_MEDIA_IO = {"video": {"num_frames": 8}}
SERVE_ARGS: tuple[str, ...] = (
    # The config class is a local Python file in the model dir (see ovis/).
    "--trust-remote-code",
    "--limit-mm-per-prompt",
    json.dumps(_LIMIT_MM),
    "--media-io-kwargs",
    json.dumps(_MEDIA_IO),
)

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
_OVIS_CONFIG_FILE = Path(__file__).parents[1] / "ovis" / "configuration_ovis2_5.py"


def write_ovis2_5(out: Path, preset: SizePreset, dtype: str) -> Shapes:
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
        **preset.text_sizes(),
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
    config: dict[str, Any] = {
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
    vit = SiglipVisionConfig(**{k: v for k, v in vit_config.items() if k not in skip})
    vit.vision_use_head = False  # not in the config class's signature
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
