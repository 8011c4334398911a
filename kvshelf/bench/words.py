"""Plain words for padding prompts, and the corpus the test models' tokenizers are trained
on: one list, so a " word" of filler is a single token for those tokenizers (real
tokenizers give about 1-2 tokens each; ``/tokenize`` measures it). No imports beyond the
standard library."""

from __future__ import annotations

import random

CORPUS_WORDS: tuple[str, ...] = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "what",
    "is",
    "in",
    "this",
    "image",
    "picture",
    "audio",
    "video",
    "describe",
    "sound",
    "hello",
    "world",
    "user",
    "assistant",
    "system",
    "you",
    "are",
    "a",
    "helpful",
    "cat",
    "sat",
    "on",
    "mat",
    "red",
    "green",
    "blue",
    "yellow",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)


def filler_text(num_words: int, seed: int = 0) -> str:
    """``num_words`` words drawn from :data:`CORPUS_WORDS`, the same for the same seed."""
    rng = random.Random(seed)
    return " ".join(rng.choice(CORPUS_WORDS) for _ in range(num_words))
