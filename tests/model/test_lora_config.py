"""LoRA's config keys: values, errors naming the key, and the keys an adapter path sets."""

from __future__ import annotations

import logging

import pytest

from fastsd.config import load_config
from fastsd.config.tree import LORA_TARGETS


def test_config_keys_and_list_values(tmp_path):
    default = load_config()
    assert default.model.lora.r == 0 and default.model.lora.target_modules == list(LORA_TARGETS)
    cfg = load_config(overrides=["model.lora=64", "model.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.model.lora.r == 64 and cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(overrides=["model.lora.target_modules=q_proj,o_proj"]).model.lora.target_modules == ["q_proj", "o_proj"]
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  lora:\n    r: 4\n    target_modules:\n      - up_proj\n      - down_proj\n")
    assert load_config(str(f)).model.lora.target_modules == ["up_proj", "down_proj"]
    f.write_text("model:\n  lora:\n    r: 4\n    target_modules: [q_proj, lm_head]\n")
    with pytest.raises(ValueError, match=r"run.yaml:4: model.lora.target_modules: \['lm_head'\] cannot be adapted"):
        load_config(str(f))


@pytest.mark.parametrize("override, key", [
    ("model.lora.r=-1", "model.lora.r"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=1", "model.lora.dropout"),
    ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ("model.lora.target_modules={a: 1}", "model.lora.target_modules"),
    ("model.lora.target_modules=[embed_tokens]", "model.lora.target_modules"),
])
def test_bad_config_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=rf"^{key}: "):
        load_config(overrides=["model.lora.r=8", override])


def test_lora_keys_an_adapter_path_sets_are_said_to_be_ignored(tmp_path, caplog):
    """model.lora.r=8 with model.lora.path trains the adapter's own r: --dry-run printed r: 8."""
    from fastsd.config.dry_run import annotated_yaml

    with caplog.at_level(logging.WARNING, logger="fastsd"):
        cfg = load_config(overrides=["model.lora.r=8", "model.lora.dropout=0.1", f"model.lora.path={tmp_path}"])
    assert "model.lora.r=8, model.lora.dropout=0.1 ignored" in caplog.text
    lines = annotated_yaml(cfg).splitlines()
    assert "    r: 8  # ignored: model.lora.path's adapter sets it" in lines
    assert any(line.startswith("    target_modules: [q_proj") and line.endswith("# ignored: model.lora.path's adapter sets it")
               for line in lines)
