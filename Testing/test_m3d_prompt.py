"""M3D-LaMed prompt ids token for token as the official code makes them, from the official file set.

Testing/data/m3d_official_tokenizer/{phi3,llama} hold tokenizers in the layout of the released
checkpoints (`tokenizer.model` + tokenizer_config.json, special_tokens_map.json, added_tokens.json,
no tokenizer.json; written by scripts/make_tiny_m3d.py) and `reference_prompt_ids.json`: the ids
transformers 4.46.0's slow LlamaTokenizer (`use_fast=False`, as LaMed loads it) gives for
`tokenizer("<im_patch>" * 256 + question)`, the call in LaMed/src/demo/demo.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from medmllm.engines.base import EngineError
from medmllm.engines.m3d.config import LamedConfig
from medmllm.engines.m3d.engine import prompt_ids
from medmllm.engines.m3d.loader import Loaded, load_tokenizer
from medmllm.grounding.m3d import DIALECT

DATA = Path(__file__).parent / "data" / "m3d_official_tokenizer"


def _loaded(family: str) -> Loaded:
    folder = DATA / family
    assert not (folder / "tokenizer.json").exists()
    config = LamedConfig.from_folder(str(folder))
    tok, im_patch, prefix, eos = load_tokenizer(str(folder), config)
    return Loaded(None, tok, config, im_patch, prefix, eos)


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_prompt_ids_match_the_official_slow_tokenizer(family: str) -> None:
    reference = json.loads((DATA / family / "reference_prompt_ids.json").read_text("utf-8"))
    loaded = _loaded(family)
    for question, ids in reference["prompts"].items():
        assert prompt_ids(loaded, DIALECT.image_prompt(question), 256) == ids, question


def test_bos_only_where_the_tokenizer_adds_it() -> None:
    phi3, llama = _loaded("phi3"), _loaded("llama")
    assert phi3.prefix_id == phi3.im_patch_id  # Phi-3: add_bos_token false
    assert llama.prefix_id == llama.tokenizer.bos_token_id == 1  # Llama-2 adds <s>


def test_im_patch_in_the_question_breaks_the_layout_and_is_refused() -> None:
    with pytest.raises(EngineError, match="256 <im_patch>"):
        prompt_ids(_loaded("llama"), DIALECT.image_prompt("what is <im_patch> here?"), 256)
