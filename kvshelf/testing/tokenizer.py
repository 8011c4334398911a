"""Offline byte-level BPE tokenizers for the tiny test models.

No Hugging Face access here, so each model's tokenizer is trained at build time on a small
fixed corpus. Byte-level BPE with the full byte alphabet encodes every string (no unknown
token needed), and training on a fixed corpus gives the same vocabulary in every process.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvshelf.bench.words import CORPUS_WORDS


def corpus_lines(num_lines: int = 400, words_per_line: int = 30, seed: int = 0) -> list[str]:
    """The fixed training corpus: `num_lines` lines of words drawn from CORPUS_WORDS."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(CORPUS_WORDS) for _ in range(words_per_line)) for _ in range(num_lines)
    ]


def train_bpe(vocab_size: int = 1000, special_tokens: Sequence[str] = ()) -> Tokenizer:
    """Train a byte-level BPE on the fixed corpus; `special_tokens` get the first ids, in order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(dict.fromkeys(special_tokens)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer)
    return tokenizer


def _pad_vocab_to(tokenizer: Tokenizer, num_ids: int) -> Tokenizer:
    """Fill the vocabulary with unreachable tokens up to id `num_ids - 1`.

    Some vLLM models hard-code token ids (Ovis2.5 expects Qwen's `<|image_pad|>` = 151655);
    padding puts the special tokens added afterwards at those ids. No merge produces a filler
    token, so the encoder never emits one.
    """
    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if len(vocab) > num_ids:
        raise ValueError(f"vocabulary already has {len(vocab)} ids, cannot pad to {num_ids}")
    for token_id in range(len(vocab), num_ids):
        vocab[f"<|filler_{token_id}|>"] = token_id
    return Tokenizer.from_str(json.dumps(spec))


def build_tokenizer(
    *,
    special_tokens: Sequence[str],
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
    unk_token: str | None = None,
    first_special_id: int | None = None,
    chat_template: str | None = None,
    vocab_size: int = 1000,
    named_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer whose special tokens are marked special.

    `special_tokens` must include every token named by `eos_token`/`pad_token`/`bos_token`/
    `unk_token`. With `first_special_id`, the special tokens get consecutive ids from it;
    otherwise they get the lowest ids. `named_tokens` gives special tokens attribute names
    that processors look up (Gemma 3's `boi_token`, `image_token`, ...).
    """
    specials = list(dict.fromkeys(special_tokens))
    named = [t for t in (eos_token, pad_token, bos_token, unk_token) if t is not None]
    missing = [t for t in named if t not in specials]
    if missing:
        raise ValueError(f"tokens {missing} are used as eos/pad/bos/unk but not in special_tokens")
    if first_special_id is None:
        backend = train_bpe(vocab_size, specials)
    else:
        backend = _pad_vocab_to(train_bpe(vocab_size), first_special_id)
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in specials]
        )
    kwargs: dict[str, object] = {"eos_token": eos_token, "pad_token": pad_token}
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if unk_token is not None:
        kwargs["unk_token"] = unk_token
    if named_tokens:
        kwargs["extra_special_tokens"] = dict(named_tokens)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    # Registering them as additional special tokens keeps them whole when decoding and lets
    # `skip_special_tokens` drop them.
    extra = [t for t in specials if t not in named]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """The id of one token (`convert_tokens_to_ids` is typed for lists too)."""
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int):
        raise TypeError(f"{token!r} maps to {found!r}, not one id")
    return found
