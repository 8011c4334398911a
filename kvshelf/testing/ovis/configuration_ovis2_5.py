"""Local stand-in for the remote-code config of Ovis2.5 (model_type "ovis2_5").

The real class lives in the model's Hugging Face repo, which is out of reach offline. This
file is copied next to a tiny model's config.json and loaded through its `auto_map` with
`--trust-remote-code`. It defines only the fields vLLM's `Ovis2_5` and `Siglip2NavitModel`
read; vLLM maps `llm_config` to `text_config` itself. It must import nothing but transformers.
"""

from typing import Any, ClassVar

from transformers import PretrainedConfig, Qwen3Config


class Siglip2NavitConfig(PretrainedConfig):
    """Vision tower config: a SigLIP2 NaViT encoder."""

    model_type = "siglip2_navit"

    def __init__(
        self,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_channels: int = 3,
        num_patches: int = -1,
        image_size: int = 512,
        patch_size: int = 16,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        hidden_stride: int = 2,
        window_size: int = 112,
        fullatt_block_indexes: list[int] | None = None,
        temporal_patch_size: int = 1,
        preserve_original_pe: bool = True,
        use_rope: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.num_patches = num_patches
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.hidden_stride = hidden_stride
        self.window_size = window_size
        self.fullatt_block_indexes = fullatt_block_indexes
        self.temporal_patch_size = temporal_patch_size
        self.preserve_original_pe = preserve_original_pe
        self.use_rope = use_rope


class Ovis2_5_Config(PretrainedConfig):
    """Top-level config: a Qwen3 language model plus a visual tokenizer."""

    model_type = "ovis2_5"
    sub_configs: ClassVar[dict[str, type[PretrainedConfig]]] = {
        "llm_config": Qwen3Config,
        "vit_config": Siglip2NavitConfig,
    }

    def __init__(
        self,
        llm_config: dict[str, Any] | Qwen3Config | None = None,
        vit_config: dict[str, Any] | Siglip2NavitConfig | None = None,
        visual_vocab_size: int = 65536,
        hidden_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # config.json stores the sub-configs as dicts; their "model_type" is a class
        # attribute, not a constructor argument.
        if isinstance(llm_config, dict):
            llm_config = Qwen3Config(**_without_model_type(llm_config))
        if isinstance(vit_config, dict):
            vit_config = Siglip2NavitConfig(**_without_model_type(vit_config))
        self.llm_config = llm_config
        self.vit_config = vit_config
        self.visual_vocab_size = visual_vocab_size
        self.hidden_size = hidden_size


def _without_model_type(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key != "model_type"}
