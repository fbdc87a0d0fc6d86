"""MiniGPT-Med loading: the three official inputs, checked tensor by tensor, and the network pieces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import load_script
from medmllm.engines.base import EngineError
from medmllm.engines.minigptmed.config import MiniGPTMedConfig
from medmllm.engines.minigptmed.eva_vit import Attention, interpolate_pos_embed
from medmllm.engines.minigptmed.loader import (
    LORA_PREFIX,
    check_memory,
    llama_parameters,
    load,
    load_tokenizer,
    resolve_inputs,
)
from medmllm.engines.minigptmed.model import CLIP_MEAN, CLIP_STD, image_tensor
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "Testing" / ".tiny" / "minigptmed-loader"


def _maker():
    return load_script("make_tiny_minigptmed")


@pytest.fixture(scope="module")
def tiny():
    shutil.rmtree(TINY, ignore_errors=True)
    return _maker().make_tiny(str(TINY), seed=3)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load(tiny["model"], tiny["llama"], tiny["eva"], MiniGPTMedConfig.from_value(tiny["config"]))


def _load(paths):
    return load(paths["model"], paths["llama"], paths["eva"], MiniGPTMedConfig.from_value(paths["config"]))


def _copy(tiny, tmp_path: Path):
    out = {k: str(tmp_path / Path(v).name) for k, v in tiny.items()}
    for key, src in tiny.items():
        (shutil.copytree if key == "llama" else shutil.copy)(src, out[key])
    return out


def _edit_pth(path: str, edit) -> None:
    data = torch.load(path, weights_only=True)
    edit(data)
    torch.save(data, path)


def test_lora_is_merged_into_q_and_v_only(tiny, loaded):
    base = load_file(str(Path(tiny["llama"]) / "model.safetensors"))
    lora = torch.load(tiny["model"], weights_only=True)["model"]
    scaling = 16.0 / 4
    for layer in range(2):
        attn = loaded.model.llama_model.model.layers[layer].self_attn
        for target in ("q_proj", "v_proj"):
            key = f"{LORA_PREFIX}{layer}.self_attn.{target}"
            expected = base[f"model.layers.{layer}.self_attn.{target}.weight"] + (
                lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"] * scaling
            )
            torch.testing.assert_close(getattr(attn, target).weight, expected)
        torch.testing.assert_close(attn.k_proj.weight, base[f"model.layers.{layer}.self_attn.k_proj.weight"])
    torch.testing.assert_close(loaded.model.llama_proj.weight, lora["llama_proj.weight"])


def test_eva_grid_is_interpolated_and_the_surplus_skipped(tiny, loaded):
    eva = torch.load(tiny["eva"], weights_only=True)
    vit = loaded.model.visual_encoder
    assert eva["pos_embed"].shape == (1, 257, 32)
    assert vit.pos_embed.shape == (1, 1025, 32)
    torch.testing.assert_close(vit.pos_embed[:, 0], eva["pos_embed"][:, 0])
    assert len(vit.blocks) == 2 and "blocks.2.attn.qkv.weight" in eva
    torch.testing.assert_close(vit.blocks[1].attn.q_bias, eva["blocks.1.attn.q_bias"])
    # ln_vision is frozen at its default in MiniGPT-v2 and never saved.
    assert torch.equal(loaded.model.ln_vision.weight, torch.ones(32))


def test_interpolation_keeps_a_constant_grid_and_the_cls_entry():
    pos = torch.full((1, 17, 8), 0.5)
    pos[0, 0] = 7.0
    out = interpolate_pos_embed(pos, 64)
    assert out.shape == (1, 65, 8)
    assert torch.allclose(out[0, 1:], torch.full((64, 8), 0.5), atol=1e-6) and torch.all(out[0, 0] == 7.0)
    assert interpolate_pos_embed(pos, 16) is pos
    with pytest.raises(ValueError, match="square grid"):
        interpolate_pos_embed(pos, 20)


def test_tokenizer_uses_the_official_pad_token(loaded):
    assert loaded.tokenizer.pad_token == "$$"
    assert loaded.bos_id == 1 and loaded.eos_ids == (2,)


def test_the_folder_holds_the_official_tokenizer_files(tiny):
    """Llama-2-7b-chat-hf's tokenizer files (names checked against the Hugging Face repository's
    listing): the SentencePiece model, its configuration, and the converted tokenizer.json."""
    names = {p.name for p in Path(tiny["llama"]).iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names


def test_a_folder_with_only_the_sentencepiece_model_reads_the_same(tiny, loaded, tmp_path):
    """A folder converted from Meta's weights without `tokenizers` has tokenizer.model but no
    tokenizer.json: transformers converts it, and every prompt gets the same ids."""
    paths = _copy(tiny, tmp_path)
    (Path(paths["llama"]) / "tokenizer.json").unlink()
    config = transformers.LlamaConfig.from_pretrained(paths["llama"])
    tok, bos, eos = load_tokenizer(paths["llama"], config)
    prompt = "[INST] <Img></Img> [refer] where is the nodule in the left lung ? [/INST] $$"
    assert tok(prompt)["input_ids"] == loaded.tokenizer(prompt)["input_ids"]
    assert tok(prompt)["input_ids"][0] == bos == 1 and eos == (2,) and tok.pad_token == "$$"
    (Path(paths["llama"]) / "tokenizer.model").unlink()
    with pytest.raises(EngineError, match=r"neither tokenizer\.json nor tokenizer\.model"):
        load_tokenizer(paths["llama"], config)  # transformers alone builds an empty tokenizer


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m.pop(f"{LORA_PREFIX}1.self_attn.v_proj.lora_B.weight"),
            "missing tensor.*layers.1.self_attn.v_proj.lora_B",
        ),
        (lambda m: m.__setitem__("llama_proj.extra", torch.zeros(1)), "unexpected tensor.*llama_proj.extra"),
        (
            lambda m: m.__setitem__("llama_proj.bias", torch.zeros(65)),
            r"wrong shape: llama_proj.bias is \[65\], expected \[64\]",
        ),
        (
            lambda m: m.__setitem__(f"{LORA_PREFIX}0.self_attn.q_proj.lora_A.weight", torch.zeros(8, 64)),
            r"q_proj.lora_A.weight is \[8, 64\], expected \[4, 64\]",
        ),
    ],
)
def test_minigptmed_checkpoint_problems_are_named(tiny, tmp_path, edit, message):
    paths = _copy(tiny, tmp_path)
    _edit_pth(paths["model"], lambda data: edit(data["model"]))
    with pytest.raises(EngineError, match=f"MiniGPT-Med checkpoint .*{message}"):
        _load(paths)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("blocks.0.attn.q_bias"), "missing tensor.*blocks.0.attn.q_bias"),
        (
            lambda s: s.__setitem__("blocks.0.attn.k_bias", torch.zeros(32)),
            "unexpected tensor.*blocks.0.attn.k_bias",
        ),
        (
            lambda s: s.__setitem__("blocks.1.mlp.fc1.weight", torch.zeros(60, 32)),
            "blocks.1.mlp.fc1.weight is \\[60, 32\\]",
        ),
        (lambda s: s.__setitem__("pos_embed", torch.zeros(1, 200, 32)), "pos_embed is \\[1, 200, 32\\]"),
    ],
)
def test_eva_checkpoint_problems_are_named(tiny, tmp_path, edit, message):
    paths = _copy(tiny, tmp_path)
    _edit_pth(paths["eva"], edit)
    with pytest.raises(EngineError, match=f"EVA-ViT-g checkpoint .*{message}"):
        _load(paths)


def test_swapped_files_are_recognised(tiny):
    swapped = {**tiny, "model": tiny["eva"]}
    with pytest.raises(EngineError, match=r"no 'model' entry.*looks like eva_vit_g.pth"):
        _load(swapped)
    swapped = {**tiny, "eva": tiny["model"]}
    with pytest.raises(EngineError, match="looks like a MiniGPT-Med"):
        _load(swapped)


def test_partial_download_is_reported(tiny, tmp_path):
    paths = _copy(tiny, tmp_path)
    data = Path(paths["model"]).read_bytes()
    Path(paths["model"]).write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="partial download"):
        _load(paths)


def test_missing_inputs_say_where_to_get_them(tiny, tmp_path):
    with pytest.raises(EngineError, match=r"storage.googleapis.com.*eva_vit_g.pth"):
        _load({**tiny, "eva": str(tmp_path / "nope.pth")})
    with pytest.raises(EngineError, match="Llama-2-7b-chat-hf"):
        _load({**tiny, "llama": str(tmp_path / "no-folder")})
    with pytest.raises(EngineError, match="Vision-CAIR/MiniGPT-Med"):
        load(None, tiny["llama"], tiny["eva"], MiniGPTMedConfig())


def test_llama_folder_of_another_model_or_incomplete(tiny, tmp_path):
    paths = _copy(tiny, tmp_path)
    config_path = Path(paths["llama"]) / "config.json"
    data = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**data, "model_type": "mistral"}))
    with pytest.raises(EngineError, match="'mistral' model, not LLaMA"):
        _load(paths)
    config_path.write_text(json.dumps(data))
    weights = Path(paths["llama"]) / "model.safetensors"
    state = load_file(str(weights))
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(EngineError, match=r"missing tensor.*model.layers.1.mlp.down_proj.weight"):
        _load(paths)


def test_a_folder_of_inputs_is_resolved(tiny, tmp_path):
    folder = str(TINY)
    assert resolve_inputs(folder, {}) == (tiny["model"], tiny["llama"], tiny["eva"], tiny["config"])
    other = str(tmp_path / "eva.pth")
    assert resolve_inputs(folder, {"eva": other})[2] == other
    assert resolve_inputs(tiny["model"], {"llama": "L"}) == (tiny["model"], "L", "", None)
    paths = _copy(tiny, tmp_path)
    shutil.copy(paths["model"], tmp_path / "second.pth")
    Path(paths["model"]).rename(tmp_path / "first.pth")
    with pytest.raises(
        EngineError, match=r"one MiniGPT-Med checkpoint .pth besides eva_vit_g.pth, found first.pth"
    ):
        resolve_inputs(str(tmp_path), {})


def test_memory_is_checked_before_loading(loaded):
    from transformers import LlamaConfig

    llama7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32000)
    assert round(llama_parameters(llama7b) / 1e9, 2) == 6.74
    assert llama_parameters(loaded.model.lm.config) == sum(p.numel() for p in loaded.model.lm.parameters())
    needed = check_memory(MiniGPTMedConfig(), llama7b, torch.float16, "cpu", available=64 << 30)
    assert 16 << 30 < needed < 18 << 30
    with pytest.raises(
        EngineError, match=r"needs about 3\d\.\d GiB .*6.74B \+ EVA 0.99B.*float32.*1.0 GiB free"
    ):
        check_memory(MiniGPTMedConfig(), llama7b, torch.float32, "cpu", available=1 << 30)


def test_config_rejects_unknown_and_bad_sizes():
    with pytest.raises(EngineError, match=r"unknown MiniGPT-Med config key.*vision_widht"):
        MiniGPTMedConfig.from_value({"vision_widht": 32})
    with pytest.raises(EngineError, match="divisible by vision_heads"):
        MiniGPTMedConfig(vision_width=30, vision_heads=4)
    assert MiniGPTMedConfig().image_tokens == 256 and MiniGPTMedConfig().mlp_hidden == 6144


def test_preprocessing_is_a_plain_bicubic_stretch_with_clip_statistics():
    white = image_tensor(np.full((30, 50), 255, np.uint8), 448)
    assert white.shape == (1, 3, 448, 448)
    for c in range(3):
        assert torch.allclose(white[0, c], torch.tensor((1 - CLIP_MEAN[c]) / CLIP_STD[c]))
    half = np.zeros((10, 40), np.uint8)
    half[:, 20:] = 255
    x = image_tensor(half, 448)
    # The column edge stays at the middle: no padding, no aspect-ratio preservation.
    assert x[0, 0, :, 200].max() < 0 and x[0, 0, :, 248].min() > 0
    assert torch.allclose(
        x[0, 0] * CLIP_STD[0] + CLIP_MEAN[0], x[0, 1] * CLIP_STD[1] + CLIP_MEAN[1], atol=1e-6
    )


def test_attention_matches_the_official_formula():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(1, 5, 8)
    q, k, v = (x @ w.T for w in attn.qkv.weight.chunk(3))
    q, v = q + attn.q_bias, v + attn.v_bias
    cols = [slice(0, 4), slice(4, 8)]  # 2 heads of 4; the key has no bias; scale 4 ** -0.5
    heads = [torch.softmax(q[..., c] @ k[..., c].transpose(-1, -2) * 0.5, -1) @ v[..., c] for c in cols]
    expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x), expected)


def test_four_neighbouring_patches_make_one_token(loaded):
    model = loaded.model
    image = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        tokens = model.encode_img(image)
        feats = model.ln_vision(model.visual_encoder(image))[0, 1:]
        for t in (0, 7, 255):
            manual = model.llama_proj(feats[4 * t : 4 * t + 4].reshape(-1))
            torch.testing.assert_close(tokens[0, t], manual)
    assert tokens.shape == (1, 256, 64)
