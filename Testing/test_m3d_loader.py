"""Loading official-format M3D-LaMed folders: layouts, strict names/shapes, partial downloads, memory."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # noqa: F401
from conftest import load_script
from medmllm.engines.base import ChatContext, ChatTurn, EngineError, EngineOptions, TokenOut
from medmllm.engines.m3d.config import LamedConfig
from medmllm.engines.m3d.loader import check_memory, load, weight_files
from medmllm.engines.registry import create_engine
from medmllm.geometry.volume import Volume
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "Testing" / ".tiny"


def _maker():
    return load_script("make_tiny_m3d")


@pytest.fixture(scope="session")
def tiny_variants():
    maker = _maker()
    out = {}
    for family, layout in (("phi3", "single"), ("phi3", "sharded"), ("llama", "bin")):
        folder = TINY / f"loader-{family}-{layout}"
        shutil.rmtree(folder, ignore_errors=True)
        out[(family, layout)] = Path(maker.make_tiny(str(folder), family, layout, seed=1))
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(("family", "layout"), [("phi3", "single"), ("phi3", "sharded"), ("llama", "bin")])
def test_every_layout_loads_the_same_tensors(tiny_variants, family, layout):
    folder = tiny_variants[(family, layout)]
    loaded = load(str(folder), device="cpu")
    assert loaded.config.family == family
    state = loaded.model.lm.state_dict()
    if layout == "bin":
        source = torch.load(folder / "pytorch_model.bin", weights_only=True)
    else:
        source = {}
        for path in weight_files(str(folder)):
            source.update(load_file(path))
    assert set(source) == set(state)
    for name, tensor in source.items():
        assert torch.equal(state[name], tensor), name
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.im_patch_id) == "<im_patch>"
    # Llama-2's tokenizer adds BOS (1) to every prompt, Phi-3's starts it with <im_patch> itself
    assert loaded.prefix_id == (1 if family == "llama" else loaded.im_patch_id)
    assert loaded.eos_ids == (
        (2,) if family == "llama" else (loaded.im_patch_id - 11, loaded.im_patch_id - 4)
    )


def test_sharded_index_lists_two_files(tiny_variants):
    files = weight_files(str(tiny_variants[("phi3", "sharded")]))
    assert [Path(f).name for f in files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_tensor_is_named(tiny_variants, tmp_path):
    folder = _copy(tiny_variants[("phi3", "single")], tmp_path)
    _rewrite(folder, lambda s: s.pop("model.seg_module.mask_decoder.iou_token.weight"))
    with pytest.raises(
        EngineError, match=r"missing tensor\(s\): model.seg_module.mask_decoder.iou_token.weight"
    ):
        load(str(folder), device="cpu")


def test_unexpected_tensor_is_named(tiny_variants, tmp_path):
    folder = _copy(tiny_variants[("phi3", "single")], tmp_path)
    _rewrite(folder, lambda s: s.update({"model.text_encoder.weight": torch.zeros(2)}))
    with pytest.raises(EngineError, match=r"unexpected tensor\(s\): model.text_encoder.weight"):
        load(str(folder), device="cpu")


def test_misshaped_tensor_is_named(tiny_variants, tmp_path):
    folder = _copy(tiny_variants[("phi3", "single")], tmp_path)
    name = "model.mm_projector.projector.0.weight"
    _rewrite(folder, lambda s: s.update({name: torch.zeros(3, 3)}))
    with pytest.raises(EngineError, match=rf"wrong shape: {name} is \[3, 3\], expected \[64, 32\]"):
        load(str(folder), device="cpu")


def test_saved_rotary_buffers_are_ignored(tiny_variants, tmp_path):
    folder = _copy(tiny_variants[("phi3", "single")], tmp_path)
    _rewrite(folder, lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    assert load(str(folder), device="cpu").config.family == "phi3"


def test_missing_shard_is_an_incomplete_download(tiny_variants, tmp_path):
    folder = _copy(tiny_variants[("phi3", "sharded")], tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EngineError, match=r"incomplete download.*model-00002-of-00002\.safetensors"):
        load(str(folder), device="cpu")


def test_no_weights_and_no_folder(tiny_variants, tmp_path):
    folder = _copy(tiny_variants[("phi3", "single")], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="no weights"):
        load(str(folder), device="cpu")
    with pytest.raises(EngineError, match="does not exist"):
        load(str(tmp_path / "nope"), device="cpu")


def test_truncated_safetensors_file(tiny_variants, tmp_path):
    folder = _copy(tiny_variants[("phi3", "single")], tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(EngineError, match="cannot read"):
        load(str(folder), device="cpu")


def test_checkpoint_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", "hidden_size": 8}))
    with pytest.raises(EngineError, match=r"model_type 'phi3'.*lamed_phi3"):
        load(str(tmp_path), device="cpu")


def test_tokenizer_without_seg_token(tiny_variants, tmp_path):
    folder = _copy(tiny_variants[("phi3", "single")], tmp_path)
    added = json.loads((folder / "added_tokens.json").read_text())
    del added["[SEG]"]
    (folder / "added_tokens.json").write_text(json.dumps(added))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        k: v for k, v in config["added_tokens_decoder"].items() if v["content"] != "[SEG]"
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match=r"no \[SEG\] token"):
        load(str(folder), device="cpu")


def test_a_folder_without_its_sentencepiece_model_is_refused(tiny_variants, tmp_path):
    """The official folder has tokenizer.model and no tokenizer.json; without the model file
    transformers would build a tokenizer of the added tokens only, which passes every token check."""
    folder = _copy(tiny_variants[("phi3", "single")], tmp_path)
    assert not (folder / "tokenizer.json").exists()
    (folder / "tokenizer.model").unlink()
    with pytest.raises(EngineError, match=r"neither tokenizer\.json nor tokenizer\.model.*M3D-LaMed"):
        load(str(folder), device="cpu")


def test_not_enough_memory_is_refused_before_loading():
    with pytest.raises(
        EngineError, match=r"not enough memory on cpu: .*8\.5 GiB.*4\.05B parameters as bfloat16"
    ):
        check_memory(4_050_000_000, torch.bfloat16, "cpu", available=4 << 30)
    assert check_memory(1000, torch.float32, "cpu", available=1 << 30) > 4000


def test_load_checks_memory_before_building(tiny_variants, monkeypatch):
    from medmllm.engines.m3d import loader

    read = []
    monkeypatch.setattr(loader, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(loader, "_iter_tensors", lambda files: read.append(files) or iter(()))
    with pytest.raises(EngineError, match="not enough memory on cpu"):
        load(str(tiny_variants[("phi3", "single")]), device="cpu")
    assert not read  # refused before a single weight was read


def test_bad_dtype_and_device(tiny_variants):
    with pytest.raises(EngineError, match="unknown dtype"):
        load(str(tiny_variants[("phi3", "single")]), device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA GPU"):
            load(str(tiny_variants[("phi3", "single")]), device="cuda")


def test_llama_checkpoint_answers_through_the_engine(tiny_variants):
    engine = create_engine("m3d", EngineOptions(model=str(tiny_variants[("llama", "bin")]), device="cpu"))
    volume = Volume.from_array(np.arange(8 * 20 * 24, dtype=np.float32).reshape(8, 20, 24), np.eye(4))
    ctx = ChatContext(volume, "v", [ChatTurn("user", "Describe the findings.")], max_new_tokens=6)
    events = list(engine.chat(ctx, threading.Event()))
    assert any(isinstance(e, TokenOut) for e in events)
    assert engine.models()[0].description.startswith("M3D-LaMed-Llama-2-7B")


def test_config_keeps_llama_vocab(tiny_variants):
    cfg = LamedConfig.from_folder(str(tiny_variants[("llama", "bin")]))
    assert cfg.family == "llama" and cfg.seg_token_id == cfg.vocab_size - 1


def test_tiny_checkpoints_have_exactly_the_official_file_set(tiny_variants):
    tokenizer = set(_maker().TOKENIZER_FILES)
    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert {p.name for p in tiny_variants[("phi3", "sharded")].iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        *shards,
        *tokenizer,
    }
    assert {p.name for p in tiny_variants[("llama", "bin")].iterdir()} == {
        "config.json",
        "pytorch_model.bin",
        *tokenizer,
    }
