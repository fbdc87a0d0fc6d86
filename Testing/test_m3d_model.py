"""M3D-LaMed modules: official tensor names/shapes at full size, and the math of each block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401
from medmllm.engines.base import EngineError
from medmllm.engines.m3d.config import LamedConfig
from medmllm.engines.m3d.generation import pick_token
from medmllm.engines.m3d.loader import expected_shapes
from medmllm.engines.m3d.projector import SpatialPoolingProjector
from medmllm.engines.m3d.segvol import PositionEmbeddingRandom
from medmllm.engines.m3d.vit3d import ViT3D, transformer_block
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViT

# Phi-3-mini-4k keys as in the M3D-LaMed-Phi-3-4B config.json (official LaMed keys, no optional ones).
PHI3_FULL = {
    "model_type": "lamed_phi3",
    "architectures": ["LamedPhi3ForCausalLM"],
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32015,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "sliding_window": 2047,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "tie_word_embeddings": False,
    "image_channel": 1,
    "image_size": [32, 256, 256],
    "patch_size": [4, 16, 16],
    "vision_tower": "vit3d",
    "vision_select_layer": -1,
    "vision_select_feature": "patch",
    "mm_projector_type": "spp",
    "proj_layer_type": "mlp",
    "proj_layer_num": 2,
    "proj_pooling_type": "spatial",
    "proj_pooling_size": 2,
    "mm_hidden_size": 768,
    "segmentation_module": "segvol",
    "seg_token_id": 32014,
    "torch_dtype": "float32",
}

OFFICIAL_SHAPES = {
    "model.embed_tokens.weight": (32015, 3072),
    "lm_head.weight": (32015, 3072),
    "model.layers.31.self_attn.qkv_proj.weight": (9216, 3072),
    "model.vision_tower.vision_tower.cls_token": (1, 1, 768),
    "model.vision_tower.vision_tower.patch_embedding.position_embeddings": (1, 2048, 768),
    "model.vision_tower.vision_tower.patch_embedding.patch_embeddings.1.weight": (768, 1024),
    "model.vision_tower.vision_tower.blocks.11.attn.qkv.weight": (2304, 768),
    "model.vision_tower.vision_tower.blocks.11.mlp.linear1.weight": (3072, 768),
    "model.vision_tower.vision_tower.norm.weight": (768,),
    "model.mm_projector.projector.0.weight": (3072, 768),
    "model.mm_projector.projector.2.weight": (3072, 3072),
    "model.seg_projector.0.weight": (3072, 3072),
    "model.seg_projector.2.weight": (768, 3072),
    "model.seg_module.image_encoder.patch_embedding.patch_embeddings.1.weight": (768, 1024),
    "model.seg_module.image_encoder.blocks.11.attn.out_proj.weight": (768, 768),
    "model.seg_module.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (3, 384),
    "model.seg_module.prompt_encoder.mask_downscaling.6.weight": (768, 16, 1, 1),
    "model.seg_module.prompt_encoder.no_mask_embed.weight": (1, 768),
    "model.seg_module.mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight": (384, 768),
    "model.seg_module.mask_decoder.transformer.layers.0.mlp.lin1.weight": (2048, 768),
    "model.seg_module.mask_decoder.output_upscaling.0.weight": (768, 192, 2, 2, 2),
    "model.seg_module.mask_decoder.output_upscaling.1.weight": (192, 16, 32, 32),
    "model.seg_module.mask_decoder.output_upscaling.3.weight": (192, 96, 2, 2, 2),
    "model.seg_module.mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": (96, 768),
    "model.seg_module.mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
    "model.seg_module.mask_decoder.txt_align_upscaled_embedding.weight": (96, 768),
    "model.seg_module.mask_decoder.mask_tokens.weight": (4, 768),
}


def test_full_size_phi3_has_official_names_shapes_and_parameter_count():
    shapes, params = expected_shapes(LamedConfig.from_dict(PHI3_FULL))
    for name, shape in OFFICIAL_SHAPES.items():
        assert shapes[name] == shape, name
    assert "model.seg_module.image_encoder.cls_token" not in shapes  # MONAI ViT, classification=False
    assert not any("norm_cross_attn" in k or "classification_head" in k for k in shapes)  # MONAI 1.3 tree
    assert not any("rotary" in k for k in shapes)
    # The four fp32 shards on the hub total about 16.2 GB, i.e. about 4.05B parameters.
    assert 4.0e9 < params < 4.1e9


def test_llama_family_uses_llama_names():
    cfg = dict(
        PHI3_FULL, model_type="lamed_llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1
    )
    cfg.update(num_attention_heads=4, num_key_value_heads=4, vocab_size=32004, seg_token_id=32003)
    shapes, _ = expected_shapes(LamedConfig.from_dict(cfg))
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (64, 64)
    assert shapes["model.mm_projector.projector.0.weight"] == (64, 768)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "qwen2"}, "model_type 'qwen2'"),
        ({"mm_projector_type": "linear"}, "mm_projector_type"),
        ({"image_size": [32, 256]}, "image_size"),
        ({"patch_size": [5, 16, 16]}, "not divisible"),
        ({"seg_token_id": 99999}, "seg_token_id"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_config_errors_name_the_problem(change, message):
    with pytest.raises(EngineError, match=message):
        LamedConfig.from_dict({**PHI3_FULL, **change})


def test_config_from_folder_errors(tmp_path: Path):
    with pytest.raises(EngineError, match=r"no config\.json"):
        LamedConfig.from_folder(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match="cannot read"):
        LamedConfig.from_folder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(EngineError, match="M3D-LaMed"):
        LamedConfig.from_folder(str(tmp_path))


def test_official_defaults_and_token_count():
    cfg = LamedConfig.from_dict(PHI3_FULL)
    assert (cfg.vision_hidden_size, cfg.vision_mlp_dim, cfg.vision_num_layers, cfg.vision_num_heads) == (
        768,
        3072,
        12,
        12,
    )
    assert (cfg.seg_embed_dim, cfg.seg_decoder_mlp_dim) == (768, 2048)
    assert cfg.patch_grid == (8, 16, 16)
    assert cfg.num_image_tokens == 256
    assert cfg.text_config().model_type == "phi3"
    # Sequences stop at Phi-3's sliding window, so the window itself can be dropped (full attention).
    assert cfg.context_length == 2047 and cfg.text_config().sliding_window is None


def test_patch_tokens_are_d_major_like_a_strided_conv():
    """MONAI's perceptron order (p1 p2 p3 c), D-major tokens == Conv3d(k=s=patch) with permuted weights.

    The projector's pooling relies on this token order."""
    torch.manual_seed(0)
    vit = ViT3D(3, (8, 32, 16), (2, 8, 4), 6, 8, 0, 2, cls_token=False)
    x = torch.randn(2, 3, 8, 32, 16)
    linear = vit.patch_embedding.patch_embeddings[1]
    tokens = vit.patch_embedding.patch_embeddings(x)
    conv = torch.nn.Conv3d(3, 6, kernel_size=(2, 8, 4), stride=(2, 8, 4))
    with torch.no_grad():
        conv.weight.copy_(linear.weight.reshape(6, 2, 8, 4, 3).permute(0, 4, 1, 2, 3))
        conv.bias.copy_(linear.bias)
    expected = conv(x).flatten(2).transpose(1, 2)
    assert torch.allclose(tokens, expected, atol=1e-5)


def test_sdpa_block_equals_monais_default_einsum_block():
    """The attention path we pick changes nothing but speed: same weights, same output."""
    torch.manual_seed(0)
    ours = transformer_block(12, 20, 3)
    einsum = TransformerBlock(12, 20, 3)
    assert einsum.load_state_dict(ours.state_dict(), strict=False).missing_keys == [
        "norm_cross_attn.weight",
        "norm_cross_attn.bias",
    ]
    x = torch.randn(2, 7, 12)
    assert torch.allclose(ours(x), einsum(x), atol=1e-6)


def test_seg_encoder_equals_monais_vit_as_segvol_builds_it():
    """SegVol's encoder is `monai.networks.nets.ViT(pos_embed="perceptron", classification=False)`."""
    torch.manual_seed(0)
    ours = ViT3D(1, (8, 32, 32), (4, 16, 16), 12, 20, 2, 3, cls_token=False).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    official = ViT(1, (8, 32, 32), (4, 16, 16), 12, 20, 2, 3, proj_type="perceptron").eval()
    missing = official.load_state_dict(ours.state_dict(), strict=False).missing_keys
    unused = [f"blocks.{i}.norm_cross_attn.{w}" for i in (0, 1) for w in ("weight", "bias")]
    assert sorted(missing) == sorted(unused)
    x = torch.rand(2, 1, 8, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), official(x)[0], atol=1e-5)


def test_projector_pools_d_major():
    proj = SpatialPoolingProjector((2, 4, 4), 3, 3, 1, 2)
    with torch.no_grad():
        proj.projector[0].weight.copy_(torch.eye(3))
        proj.projector[0].bias.zero_()
    grid = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    x = grid.reshape(1, 32, 1).repeat(1, 1, 3)  # token t holds value t (D-major order)
    out = proj(x)
    assert out.shape == (1, 4, 3)
    expected = torch.nn.functional.avg_pool3d(grid[None], 2).flatten()
    assert torch.allclose(out[0, :, 0], expected)


def test_dense_positional_encoding_axis_order():
    pe = PositionEmbeddingRandom(2)
    with torch.no_grad():
        pe.positional_encoding_gaussian_matrix.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    out = pe((2, 4, 8))
    assert out.shape == (4, 2, 4, 8)
    # Row 0 of the matrix reads the *second* grid axis (SAM's x), row 1 the first (y).
    x = (torch.arange(4) + 0.5) / 4
    assert torch.allclose(out[0, 0, :, 0], torch.sin(2 * math.pi * (2 * x - 1)), atol=1e-5)
    y = (torch.arange(2) + 0.5) / 2
    assert torch.allclose(out[1, :, 0, 0], torch.sin(2 * math.pi * (2 * y - 1)), atol=1e-5)


def test_pick_token_greedy_and_nucleus():
    logits = torch.log(torch.tensor([0.02, 0.93, 0.05]))
    assert pick_token(logits, 0.0, 0.9, None) == 1
    generator = torch.Generator().manual_seed(0)
    assert {pick_token(logits, 1.0, 0.9, generator) for _ in range(50)} == {1}  # 0.93 alone covers top_p
    assert {pick_token(logits, 1.0, 1.0, generator) for _ in range(400)} == {0, 1, 2}
