"""The page's four tiny models and the processors written for two of them, without vLLM:
what the model dirs hold, and the token counts and tensors vLLM relies on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kvshelf.testing import build_model, serve_args
from kvshelf.testing.processors import (
    CROP_PX,
    hd_size,
    phi3v_num_image_tokens,
    ultravox_num_tokens,
)
from kvshelf.testing.reference_models import (
    PAGE_CHAT_TYPE,
    REAL_SHAPES,
    REFERENCE_FAMILIES,
    write_real_shape,
)
from kvshelf.testing.reference_writers import REMOTE_CODE_FILE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The four tiny dirs, built once."""
    root = tmp_path_factory.mktemp("reference")
    return {f: build_model(f, root / f, "xs", dtype="float32") for f in REFERENCE_FAMILIES}


def test_page_flags_are_the_pages():
    assert serve_args("llava") == [] and serve_args("llava_onevision") == []
    phi3 = serve_args("phi3_v")
    assert phi3[:3] == ["--trust-remote-code", "--max-model-len", "4096"]
    assert json.loads(phi3[phi3.index("--limit-mm-per-prompt") + 1]) == {"image": 2}
    assert serve_args("ultravox") == ["--max-model-len", "4096", "--trust-remote-code"]
    assert set(PAGE_CHAT_TYPE.values()) == {"single-image", "multi-image", "video", "audio"}


def test_tiny_dirs_name_what_vllm_needs(tiny):
    configs = {f: json.loads((d / "config.json").read_text()) for f, d in tiny.items()}
    # vLLM's phi3v.py hard-codes the image placeholder id and builds CLIP-L up to layer_idx.
    phi3 = configs["phi3_v"]
    assert phi3["model_type"] == "phi3_v" and phi3["vocab_size"] > 32044
    assert phi3["img_processor"]["layer_idx"] == 0
    assert phi3["auto_map"]["AutoConfig"].startswith(REMOTE_CODE_FILE.removesuffix(".py"))
    # Ultravox: nothing to fetch; <|audio|> is the token the placeholder expands to.
    ultravox = configs["ultravox"]
    assert ultravox["text_model_id"] is None and ultravox["audio_model_id"] is None
    assert ultravox["audio_config"]["num_mel_bins"] == 128 and ultravox["stack_factor"] == 8
    tokenizer = json.loads((tiny["ultravox"] / "tokenizer.json").read_text())
    audio = [t for t in tokenizer["added_tokens"] if t["content"] == "<|audio|>"]
    assert audio and audio[0]["id"] == ultravox["audio_token_index"]
    for family in ("phi3_v", "ultravox"):  # processors ship as remote code
        assert (tiny[family] / REMOTE_CODE_FILE).exists()
    video = json.loads((tiny["llava_onevision"] / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "LlavaOnevisionVideoProcessor"


@pytest.mark.parametrize(
    ("width", "height", "crops", "size"),
    [
        (320, 240, 4, (672, 672)),  # 4:3 fills a 2x2 grid
        (50, 8000, 4, (336, 1344)),  # 1:160 portrait: a column of 4 crops
        (336, 336, 1, (336, 336)),
        (1600, 1067, 16, (1344, 1008)),
    ],
)
def test_hd_size(width, height, crops, size):
    assert hd_size(width, height, crops) == size
    padded_w, padded_h = size
    assert (padded_w // CROP_PX) * (padded_h // CROP_PX) <= crops


def test_phi3v_token_count_matches_vllms_embedding_layout():
    # vLLM's hd_feature_transform: rows*12 x (cols*12 + 1) sub-crop tokens, 1 separator,
    # 12 x 13 for the global view.
    assert phi3v_num_image_tokens(320, 240, 4) == 2 * 12 * (2 * 12 + 1) + 1 + 12 * 13 == 757
    assert phi3v_num_image_tokens(50, 8000, 4) == 4 * 12 * (12 + 1) + 1 + 156 == 781


def test_phi3v_processor_output(tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny["phi3_v"], trust_remote_code=True)
    images = [Image.new("RGB", (320, 240), "red"), Image.new("RGB", (50, 8000), "blue")]
    out = processor(
        text="<|user|>\n<|image_1|>\n<|image_2|>\nWhat?", images=images, return_tensors="pt"
    )
    assert tuple(out["pixel_values"].shape) == (2, 5, 3, CROP_PX, CROP_PX)  # num_crops + 1
    assert out["image_sizes"].tolist() == [[672, 672], [1344, 336]]  # height, width
    ids = out["input_ids"][0].tolist()
    assert ids.count(-1) == 757 and ids.count(-2) == 781
    assert ids.index(-2) > ids.index(-1)
    assert processor.img_tokens[:2] == ["<|image_1|>", "<|image_2|>"]
    assert processor.calc_num_image_tokens_from_image_size(width=320, height=240) == 757
    # The padding crops of the 2x2 image are all zeros; the 4 real ones are not.
    assert float(out["pixel_values"][0, 1:].abs().sum()) > 0
    with pytest.raises(ValueError, match="1 image"):
        processor(text="<|image_2|>", images=images[:1])


def test_ultravox_processor_chunks_and_counts(tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny["ultravox"], trust_remote_code=True)
    audios = [np.zeros(3 * 16000, np.float32), np.zeros(70 * 16000, np.float32)]
    out = processor(
        text="hi <|audio|>",
        audios=audios,
        sampling_rate=16000,
        include_audio_num_chunks=True,
        return_tensors="pt",
    )
    # 30-s chunks: 3 s -> one chunk, 70 s -> 30 + 30 + 10.
    assert out["audio_num_chunks"].tolist() == [1, 3]
    assert out["audio_lens"].tolist() == [300, 3000, 3000, 1000]  # 100 mel frames a second
    assert out["audio_token_len"].tolist() == [19, 188, 188, 63]  # ~6.25 tokens a second
    assert tuple(out["audio_values"].shape) == (4, 128, 3000)
    assert out["input_ids"][0].tolist().count(processor.audio_replacement_token_id) == 19
    assert ultravox_num_tokens(3000, 8) == 188


@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_real_shapes_build_config_only(family, tmp_path):
    out = write_real_shape(family, tmp_path / family)
    config = json.loads((out / "config.json").read_text())
    text = config.get("text_config", config)
    assert text["hidden_size"] == REAL_SHAPES[family]["text"]["hidden_size"]
    assert not list(out.glob("*.safetensors"))  # served with --load-format dummy
