"""Model names: alias, .gguf file, directory, hub id."""

from __future__ import annotations

import pytest

from dictlens import load_model
from dictlens.data.models import _resolve, load_skeleton, smollm2_path
from dictlens.errors import InputError


def test_names_resolve_to_the_right_loader(tmp_path):
    gguf = smollm2_path()
    assert _resolve("smollm2-135m") == (str(gguf.parent), {"gguf_file": gguf.name})
    assert _resolve(str(gguf)) == (str(gguf.parent), {"gguf_file": gguf.name})
    (tmp_path / "only.gguf").write_bytes(b"")
    assert _resolve(str(tmp_path)) == (str(tmp_path), {"gguf_file": "only.gguf"})
    assert _resolve("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", {})
    with pytest.raises(InputError, match="missing.gguf does not exist"):
        _resolve(str(tmp_path / "missing.gguf"))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(InputError, match=r"cannot load model 'no-such-org/no-such-model' \(HF_HUB_OFFLINE=1 is set\)"):
        load_model("no-such-org/no-such-model")


def test_skeleton_has_the_structure_without_weights(tiny_model_dirs):
    from dictlens import named_hooks

    skeleton = load_skeleton(str(tiny_model_dirs["llama"]))
    assert next(skeleton.parameters()).device.type == "meta"
    assert "resid_post.3" in named_hooks(skeleton)


def test_default_model_skeleton():
    skeleton = load_skeleton("smollm2-135m")
    assert skeleton.config.num_hidden_layers == 30 and skeleton.config.hidden_size == 576
