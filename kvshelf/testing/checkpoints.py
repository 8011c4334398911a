"""What every tiny-model writer shares: language-model sizes, checkpoint tensor shapes and
seeded random checkpoints.

Why real weights: vLLM's `--load-format dummy` fills every tensor, norms included, with
uniform values in +-1e-3, which makes the logits uniform: every prompt gives the same greedy
output, so comparing outputs could never catch a wrong KV cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INIT_STD = 0.02
_INIT_SEED = 0


@dataclass(frozen=True)
class SizePreset:
    """Shape of the language model; the vision/audio towers stay tiny at every size."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def text_sizes(self) -> dict[str, Any]:
        """The language model's sizes under transformers' config names."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
        }


# vLLM's CPU attention supports head sizes of 32 and up, hence xs has 4 heads of 32.
SIZES: dict[str, SizePreset] = {
    "xs": SizePreset(128, 256, 2, 4, 2),
    "s": SizePreset(256, 512, 4, 4, 2),
    "m": SizePreset(512, 1536, 8, 8, 4),
    "l": SizePreset(1024, 2816, 12, 16, 4),
    "xl": SizePreset(1536, 4096, 16, 16, 4),
}

Shapes = dict[str, tuple[int, ...]]
# (old prefix, new prefix or None to drop), first match wins.
Renames = Sequence[tuple[str, str | None]]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def pad_vocab_size(num_tokens: int, multiple: int = 64) -> int:
    return -(-num_tokens // multiple) * multiple


def meta_shapes(model_class: Any, config: Any, renames: Renames = ()) -> Shapes:
    """Tensor names (renamed to vLLM's) and shapes of a transformers model.

    Built on the meta device: no memory, no init. Names come from transformers because vLLM's
    loaders accept the Hugging Face checkpoint layout, but transformers 5 nests some
    multimodal models differently from the published checkpoints, hence `renames`.
    """
    import torch

    with torch.device("meta"):
        model = model_class(config)
    shapes: Shapes = {}
    for name, tensor in model.state_dict().items():
        new_name = _rename(name, renames)
        if new_name is not None:
            shapes[new_name] = tuple(tensor.shape)
    return shapes


def _rename(name: str, renames: Renames) -> str | None:
    for old, new in renames:
        if name.startswith(old):
            return None if new is None else new + name[len(old) :]
    return name


def write_random_checkpoint(path: Path, shapes: Shapes, std: float = INIT_STD) -> None:
    """Seeded random tensors, stored as bfloat16, in one safetensors file.

    Matrices ~ N(0, std); 1-D weights are norm scales (every matrix, embedding and conv here
    is >= 2-D) and start at 1; biases at 0. Names are drawn in sorted order, so the same torch
    gives the same bytes.
    """
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(_INIT_SEED)
    tensors = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) > 1:
            tensor = torch.empty(shape).normal_(0.0, std, generator=generator)
        elif name.endswith(".weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.zeros(shape)
        tensors[name] = tensor.to(torch.bfloat16)
    save_file(tensors, str(path), metadata={"format": "pt"})
