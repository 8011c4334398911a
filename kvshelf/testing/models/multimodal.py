"""Qwen2-Audio and Idefics3: one tower (Whisper-style audio, SigLIP vision tiles) in front
of a plain-attention LM."""

from __future__ import annotations

from pathlib import Path

from kvshelf.testing.checkpoints import Shapes, SizePreset, meta_shapes, pad_vocab_size
from kvshelf.testing.tokenizer import build_tokenizer, token_id

# --- Qwen2-Audio: Qwen2 LM + Whisper-style audio encoder --------------------------------------


def write_qwen2_audio(out: Path, preset: SizePreset, dtype: str) -> Shapes:
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
    audio_token_id = token_id(tokenizer, "<|AUDIO|>")
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
        **preset.text_sizes(),
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


_IDEFICS3_SPECIALS = [
    "<unk>",
    "<|begin_of_text|>",
    "<end_of_utterance>",
    "<pad>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),  # tile positions
]


def write_idefics3(out: Path, preset: SizePreset, dtype: str) -> Shapes:
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

    tokenizer = build_tokenizer(
        special_tokens=_IDEFICS3_SPECIALS,
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        bos_token="<|begin_of_text|>",
        unk_token="<unk>",
        chat_template=_IDEFICS3_CHAT_TEMPLATE,
    )
    image_seq_len = (_IDEFICS3_TILE_PX // _IDEFICS3_PATCH_PX) ** 2 // _IDEFICS3_SCALE**2
    # The PIL image processor: the default one needs torchvision, which is not installed.
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
        **preset.text_sizes(),
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=_IDEFICS3_SCALE,
        image_token_id=token_id(tokenizer, "<image>"),
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]  # see write_qwen2_audio
    # save_pretrained warns "pad_token_id ... got 128002": that is transformers' default
    # Idefics3Config, built to diff against; this config's ids are valid.
    config.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return meta_shapes(Idefics3ForConditionalGeneration, config)  # untied LM head
