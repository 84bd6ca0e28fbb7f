"""Goodfire's SAEs (``.pth`` state dicts with ``encoder_linear`` / ``decoder_linear``).

``f = relu(encoder_linear(x))``, ``x̂ = decoder_linear(f)``: a dictlens ReLU SAE without
pre-bias (``b_dec`` is the decoder's bias). The files name neither model nor hook; the
release name gives them (``Llama-3.1-8B-Instruct-SAE-l19``: the residual stream after
block 19 of meta-llama/Llama-3.1-8B-Instruct), else ``--model`` / ``--hook``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlens.formats.base import ReadOptions, Weights, build_sae, load_torch, need

if TYPE_CHECKING:
    from dictlens.sae.model import SAE

KEYS = {"encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias"}


class Goodfire:
    name = "goodfire"
    describe = "Goodfire SAE (.pth with encoder_linear / decoder_linear)"
    writes = False

    def _file(self, path: Path) -> Path | None:
        if path.is_file():
            return path if path.suffix == ".pth" else None
        files = sorted(path.glob("*.pth")) if path.is_dir() else []
        return files[0] if len(files) == 1 else None

    def detect(self, path: Path) -> bool:
        f = self._file(path)
        if f is None:
            return False
        state = load_torch(f)
        return isinstance(state, dict) and set(state) >= KEYS

    def read(self, path: Path, opts: ReadOptions) -> SAE:
        f = self._file(path)
        assert f is not None
        s: dict[str, Any] = load_torch(f)
        where = str(f)
        F, D = s["encoder_linear.weight"].shape
        w = Weights(need(s, "encoder_linear.weight", (F, D), where),
                    need(s, "decoder_linear.weight", (D, F), where).T.contiguous(),
                    need(s, "encoder_linear.bias", (F,), where), need(s, "decoder_linear.bias", (D,), where))
        m = re.search(r"(Llama-3\.[13]-\d+B-Instruct)-SAE-l(\d+)", f.as_posix())
        model = opts.model or (f"meta-llama/{m.group(1)}" if m else None)
        hook = opts.hook or (f"resid_post.{m.group(2)}" if m else None)
        from dictlens.provenance import Provenance

        prov = Provenance.of_sae(model=model, hook=hook, source=self.name, origin=str(f), normalization="none",
                                 notes={self.name: {"release": m.group(0) if m else None}})
        return build_sae("relu", w, pre_bias=False, provenance=prov)

    def write(self, sae: SAE, out: Path) -> list[Path]:
        from dictlens.errors import FormatError

        raise FormatError("goodfire: dictlens reads this format but does not write it")


FORMAT = Goodfire()
