"""Model directories with real 7B shapes and no weights, for vLLM's --load-format dummy.

- ``llava7b``: LLaVA-1.5-7B (CLIP ViT-L/336 + Llama-2-7B text): 32 layers, 32 KV heads,
  head size 128 -> 512 KiB of bf16 KV per token (MHA).
- ``gqa7b``: the same CLIP front with a Qwen2-7B text model (Qwen2-VL-7B's language
  model): 28 layers, 4 KV heads, head size 128 -> 56 KiB of KV per token (GQA).

Compute and KV bytes are those of the real models; the weights are random, so outputs are
meaningless and only timings count. The tokenizer is trained locally (no hub access).

usage: python benchmarks/gpu/models.py OUT_DIR {llava7b,gqa7b}
"""

from __future__ import annotations

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
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(num_words)]


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
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
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
            vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32,
            architectures=["LlamaForCausalLM"], **common,
        )
    if kind == "gqa7b":
        return Qwen2Config(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
            architectures=["Qwen2ForCausalLM"], **common,
        )
    raise ValueError(f"unknown model kind {kind!r}; use llava7b or gqa7b")


def build(out: Path, kind: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    vocab = words()
    tok = tokenizer(vocab)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
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
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276],
    )
    processor = LlavaProcessor(
        image_processor=images, tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="default", chat_template=TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "words.txt").write_text("\n".join(vocab))
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), sys.argv[2]))
