"""Prompts and user regions in each model's own conventions, the registry, and bad requests."""

from __future__ import annotations

import pytest
from medmllm.grounding.base import TASKS, Dialect
from medmllm.grounding.registry import dialect_names, get_dialect

REGION = (0.25, 0.125, 0.75, 0.5)
REGION_3D = (0.0, 0.25, 0.5, 0.5, 0.75, 1.0)


def test_registry_lists_every_dialect_and_rejects_unknown_names():
    assert {"internvl", "m3d", "medgemma", "minigptmed", "plain", "qwen25vl"} <= set(dialect_names())
    for name in dialect_names():
        dialect = get_dialect(name)
        assert isinstance(dialect, Dialect) and dialect.name == name and dialect.coordinate_range
        assert set(dialect.tasks) <= set(TASKS)
    with pytest.raises(ValueError, match=r"unknown dialect 'llava'.*internvl, qwen25vl"):
        get_dialect("llava")


def test_m3d_prompts_follow_the_m3d_templates():
    m3d = get_dialect("m3d")
    assert m3d.build_prompt("ground", "liver") == "Where is liver in this image? Please output the box."
    assert (
        m3d.build_prompt("segment", "lung")
        == "Can you segment the lung in this image? Please output the mask."
    )
    assert m3d.build_prompt("report") == "Please generate a medical report based on this image."
    assert m3d.build_prompt("chat", " Is there ascites? ") == "Is there ascites?"
    assert m3d.build_prompt("region", region=REGION_3D) == (
        "What target is present within the coordinates <bx_start>[0.0, 0.25, 0.5, 0.5, 0.75, 1.0]<bx_end> ?"
    )


def test_minigptmed_prompts_use_task_tags():
    mgm = get_dialect("minigptmed")
    assert mgm.build_prompt("ground", "tumor") == "[detection] tumor"
    assert mgm.build_prompt("region", region=REGION) == "[identify] what is this {<25><12><75><50>}"
    assert mgm.build_prompt("region", "what object is in this location", REGION).startswith(
        "[identify] what object is in this location {<25>"
    )
    assert mgm.build_prompt("report") == "Describe this image in detail"


def test_internvl_prompts_are_medregas_in_english_and_chinese():
    ivl = get_dialect("internvl")
    ground = ivl.build_prompt("ground", "carotid vessel wall")
    assert ground.startswith("You are a helpful medical assistant. Your task is object detection.")
    assert ground.endswith("Please locate <ref>carotid vessel wall</ref> in this image.")
    assert "integers ranging from 0 to 999" in ground
    chinese = ivl.build_prompt("ground", "胰腺癌")
    assert chinese.startswith("你是一个医疗助手，你的任务是定位并描述病种。")
    assert chinese.endswith("请定位并描述这张医学影像中的<ref>胰腺癌</ref>")
    assert ivl.build_prompt("chat", "这张图片的成像方式是什么?") == (
        "你是一个医疗助手，你需要根据医学图像回答问题。这张图片的成像方式是什么?"
    )
    region = ivl.build_prompt("region", region=REGION)
    assert region.startswith("You are a helpful medical assistant. Your task is object recognition.")
    assert region.endswith("What is <ref>this</ref><box>[[250, 125, 749, 500]]</box> in this image?")


def test_qwen_and_medgemma_prompts():
    qwen = get_dialect("qwen25vl")
    assert qwen.build_prompt("ground", "liver") == (
        "Outline the position of each liver and output all the coordinates in JSON format."
    )
    assert qwen.format_region(REGION, (448, 224)) == '{"bbox_2d": [112, 28, 336, 112]}'
    with pytest.raises(ValueError, match="image_size"):
        qwen.build_prompt("region", region=REGION)
    gemma = get_dialect("medgemma")
    prompt = gemma.build_prompt("ground", "right clavicle")
    assert "[y0, x0, y1, x1]" in prompt and "Where is the right clavicle?" in prompt
    assert gemma.format_region(REGION) == '{"box_2d": [125, 250, 500, 750]}'


@pytest.mark.parametrize(
    ("region", "message"),
    [
        (None, "needs a region"),
        ((0.1, 0.2, 0.3), "4 edge fractions"),
        ((0.1, 0.2, 0.3, 1.5), r"in \[0, 1\]"),
        ((0.1, 0.2, 0.3, float("nan")), r"in \[0, 1\]"),
        ((0.5, 0.2, 0.3, 0.4), "lows must not exceed highs"),
        (("a", 0.2, 0.3, 0.4), "edge fractions"),
    ],
)
def test_bad_regions_get_clear_errors(region, message):
    with pytest.raises(ValueError, match=message):
        get_dialect("internvl").build_prompt("region", region=region)


def test_unsupported_tasks_and_missing_targets_get_clear_errors():
    with pytest.raises(ValueError, match="no task 'segment'; it supports: chat, ground, region, report"):
        get_dialect("internvl").build_prompt("segment", "liver")
    with pytest.raises(ValueError, match="no task 'ground'"):
        get_dialect("plain").build_prompt("ground", "liver")
    with pytest.raises(ValueError, match="name of a structure"):
        get_dialect("m3d").build_prompt("ground", "  ")
    with pytest.raises(ValueError, match="no grammar for regions"):
        get_dialect("plain").format_region(REGION)
    with pytest.raises(ValueError, match="6 edge fractions"):
        get_dialect("m3d").format_region(REGION)
