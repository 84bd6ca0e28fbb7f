"""OpenAI's sparse_autoencoder state dicts (GPT-2 small, ``{location}[_v4|_v5_*]/autoencoders/{layer}.pt``).

Keys: ``pre_bias [D]``, ``encoder.weight [F, D]`` (no bias), ``latent_bias [F]``,
``decoder.weight [D, F]``, ``activation`` ("ReLU" or "TopK"), ``activation_state_dict``
(``{"k": ...}``) and statistics buffers. ReLU (v1, v4): ``f = relu(W (x − pre_bias) +
latent_bias)``, ``x̂ = W_dec f + pre_bias``: a dictlens ReLU SAE with pre-bias. The TopK
SAEs (v5) layer-normalise every token before encoding and undo it after decoding, which a
dictlens SAE cannot express yet: refused by name. The model is GPT-2 small; the hook comes
from the path's location and layer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlens.errors import FormatError
from dictlens.formats.base import ReadOptions, Weights, build_sae, load_torch, need

if TYPE_CHECKING:
    from dictlens.sae.model import SAE

KEYS = {"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"}
LOCATIONS = {"mlp_post_act": "transformer.h.{L}.mlp.act", "resid_delta_mlp": "mlp_out.{L}",
             "resid_delta_attn": "attn_out.{L}", "resid_post_attn": "transformer.h.{L}.ln_2:input",
             "resid_post_mlp": "resid_post.{L}"}


class OpenAI:
    name = "openai"
    describe = "OpenAI sparse_autoencoder state dict ({layer}.pt)"
    writes = False

    def detect(self, path: Path) -> bool:
        if not (path.is_file() and path.suffix == ".pt" and path.name != "ae.pt"):
            return False
        state = load_torch(path)
        return isinstance(state, dict) and set(state) >= KEYS

    def read(self, path: Path, opts: ReadOptions) -> SAE:
        s: dict[str, Any] = load_torch(path)
        where = str(path)
        activation = str(s.get("activation", "ReLU"))
        if activation != "ReLU":
            raise FormatError(f"{path}: a {activation} autoencoder, which layer-normalises every token before "
                              "encoding (OpenAI's v5 SAEs); dictlens SAEs cannot express that yet")
        F, D = s["encoder.weight"].shape
        w = Weights(need(s, "encoder.weight", (F, D), where), need(s, "decoder.weight", (D, F), where).T.contiguous(),
                    need(s, "latent_bias", (F,), where), need(s, "pre_bias", (D,), where))
        text = path.as_posix()
        loc = next((name for name in LOCATIONS if f"/{name}" in text), None)
        layer = re.search(r"(\d+)\.pt$", path.name)
        hook = opts.hook or (LOCATIONS[loc].format(L=layer.group(1)) if loc and layer else None)
        from dictlens.provenance import Provenance

        prov = Provenance.of_sae(model=opts.model or "gpt2", hook=hook, source=self.name, origin=str(path),
                                 context=64, normalization="none", notes={self.name: {"location": loc}})
        return build_sae("relu", w, pre_bias=True, provenance=prov)

    def write(self, sae: SAE, out: Path) -> list[Path]:
        raise FormatError("openai: dictlens reads this format but does not write it")


FORMAT = OpenAI()
