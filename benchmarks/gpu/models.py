"""Model directories with real 7B shapes and no weights, for vLLM's --load-format dummy.

- ``llava7b``: LLaVA-1.5-7B (CLIP ViT-L/336 + Llama-2-7B text): 32 layers, 32 KV heads,
  head size 128 -> 512 KiB of bf16 KV per token (MHA).
- ``gqa7b``: the same CLIP front with a Qwen2-7B text model (Qwen2-VL-7B's language
  model): 28 layers, 4 KV heads, head size 128 -> 56 KiB of KV per token (GQA).

Text models (``bench.json`` in the dir tells ttft.py how to serve them):

- ``qwen35_9b``: Qwen3.5-9B's shape (``Qwen3_5ForConditionalGeneration``, the class vLLM
  serves Qwen3.5 with): 24 Gated-DeltaNet layers, 8 full-attention layers with 4 KV heads of
  256 -> 32 KiB of KV per token plus a recurrent state per request.
- ``gemma3_12b``: Gemma 3 12B's text model: 40 sliding-window (1024) and 8 global layers,
  8 KV heads of 256 -> 384 KiB of KV per token, of which the window layers keep 1024 tokens.

- ``dsv2lite``: DeepSeek-V2-Lite (MLA, MoE): 27 layers, one 576-wide latent per token and
  layer -> 31 KiB of KV per token, the same on every TP rank.

The four models of LMCache's multimodal page, built by kvshelf.testing.reference_models
(``write_real_shape``), served with the page's flags (``benchmarks/gpu/reference.py`` runs
them end to end):

- ``page_llava``: llava-hf/llava-1.5-7b-hf (the llava7b shape, the page's chat template).
- ``page_phi3_v``: microsoft/Phi-3.5-vision-instruct: Phi-3 (32 layers, 32 KV heads of 96
  -> 384 KiB of KV per token) and CLIP ViT-L/336 with the HD transform (4 crops); its
  processor and config class are kvshelf.testing's (``--trust-remote-code``).
- ``page_llava_onevision``: llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m and Qwen2-7B
  (28 layers, 4 KV heads of 128 -> 56 KiB per token).
- ``page_ultravox``: fixie-ai/ultravox-v0_5-llama-3_2-1b: whisper-large-v3-turbo's encoder and
  Llama-3.2-1B (16 layers, 8 KV heads of 64 -> 32 KiB per token); kvshelf.testing's
  processor (``--trust-remote-code``).

Compute and KV bytes are those of the real models; the weights are random, so outputs are
meaningless and only timings count. The tokenizer is trained locally (no hub access).

usage: python benchmarks/gpu/models.py OUT_DIR {llava7b,gqa7b,qwen35_9b,gemma3_12b,dsv2lite,
       page_llava,page_phi3_v,page_llava_onevision,page_ultravox}
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

IMAGE_TOKEN = "<image>"
TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def words(num_words: int = 3000, seed: int = 0) -> list[str]:
    """Made-up words the tokenizer learns as single tokens."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        "".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(num_words)
    ]


def tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    rng = random.Random(1)
    corpus = [" ".join(rng.choice(vocab) for _ in range(200)) for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=["<unk>", "<s>", "</s>", IMAGE_TOKEN, "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.chat_template = TEMPLATE
    return fast


def text_config(kind: str, tok: PreTrainedTokenizerFast):
    common = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "max_position_embeddings": 32768 + 2048,
        "torch_dtype": "bfloat16",
    }
    if kind == "llava7b":
        return LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            architectures=["LlamaForCausalLM"],
            **common,
        )
    if kind == "gqa7b":
        return Qwen2Config(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_theta=1000000.0,
            architectures=["Qwen2ForCausalLM"],
            **common,
        )
    raise ValueError(f"unknown model kind {kind!r}; use llava7b or gqa7b")


def build(out: Path, kind: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    vocab = words()
    tok = tokenizer(vocab)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config(kind, tok),
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.image_token_id = image_token_id
    config.architectures = ["LlavaForConditionalGeneration"]
    config.torch_dtype = "bfloat16"
    config.save_pretrained(out)
    images = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.481, 0.458, 0.408],
        image_std=[0.269, 0.261, 0.276],
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "words.txt").write_text("\n".join(vocab))
    return out


def write_deepseek_v2(out: Path, dtype: str) -> None:
    from transformers import DeepseekV2Config

    from kvshelf.testing.models import chatml_tokenizer

    tok = chatml_tokenizer()
    config = DeepseekV2Config(
        vocab_size=-(-len(tok) // 64) * 64,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=2,
        n_routed_experts=64,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        max_position_embeddings=40960,
        dtype=dtype,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["DeepseekV2ForCausalLM"]
    config.save_pretrained(out)
    tok.save_pretrained(out)


# How ttft.py serves the text models: text prompts; GDN prefill through Triton (the
# bundle lacks what vLLM's SM90 CuTe-DSL kernel needs); SimpleCPUOffloadConnector's GPU
# cache sized (in its large hybrid blocks) so that two 8K prompts fit, not five.
TEXT_MODELS = {
    "qwen35_9b": {
        "text_only": True,
        "serve_args": ["--gdn-prefill-backend", "triton"],
        "offload_blocks": 200,
    },
    "gemma3_12b": {"text_only": True, "serve_args": [], "offload_blocks": 1400},
    "dsv2lite": {"text_only": True, "serve_args": [], "offload_blocks": 1400},
}


def build_text(out: Path, kind: str) -> Path:
    from kvshelf.bench.words import CORPUS_WORDS
    from kvshelf.testing.models import write_gemma3_text, write_qwen3_5_vl

    out.mkdir(parents=True, exist_ok=True)
    if kind == "qwen35_9b":  # transformers' defaults are the 9B text shape
        write_qwen3_5_vl(out, {"hidden_size": 4096}, {}, "bfloat16")
    elif kind == "dsv2lite":
        write_deepseek_v2(out, "bfloat16")
    else:
        write_gemma3_text(
            out,
            {
                "hidden_size": 3840,
                "intermediate_size": 15360,
                "num_hidden_layers": 48,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 256,
                "sliding_window": 1024,
                "sliding_window_pattern": 6,
            },
            "bfloat16",
            weights=False,
        )
    # The tokenizer's corpus words are one token each: prompts of known length.
    (out / "words.txt").write_text("\n".join(CORPUS_WORDS))
    (out / "bench.json").write_text(json.dumps(TEXT_MODELS[kind], indent=1))
    return out


PAGE_MODELS = ("page_llava", "page_phi3_v", "page_llava_onevision", "page_ultravox")


def build_page(out: Path, kind: str) -> Path:
    from kvshelf.testing.reference_models import write_real_shape

    return write_real_shape(kind.removeprefix("page_"), out)


if __name__ == "__main__":
    kind = sys.argv[2]
    if kind in TEXT_MODELS:
        print(build_text(Path(sys.argv[1]), kind))
    elif kind in PAGE_MODELS:
        print(build_page(Path(sys.argv[1]), kind))
    else:
        print(build(Path(sys.argv[1]), kind))
