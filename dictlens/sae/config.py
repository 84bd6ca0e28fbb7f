"""SAEConfig: every field needed to rebuild an SAE; saved as ``config.json`` beside the weights."""

from __future__ import annotations

from dataclasses import dataclass

from dictlens.config import check, field
from dictlens.errors import ConfigError
from dictlens.sae import activations
from dictlens.sae.activations import Activation

SPARSITY_PENALTIES = ("none", "l1", "tanh", "smooth_l0", "hoyer", "l0")


@dataclass
class SAEConfig:
    """Architecture of a sparse autoencoder, or of a transcoder (one encoder, writing another activation).

    f = σ(W_enc (x − b_dec) + b_enc) (the ``b_dec`` subtraction when ``pre_bias``),
    x̂ = W_decᵀ f + b_dec, with ``W_enc`` [F, D] and ``W_dec`` [F, D_out] (feature-major; D_out = D for
    an SAE). A transcoder predicts y (e.g. an MLP's output) from x (its input): no pre-bias, and with
    ``skip`` an affine skip connection, ŷ = W_decᵀ f + b_dec + W_skip x.
    """

    d_in: int = field(0, help="input width D (filled in from the activations when 0)", cli=False)
    transcoder: bool = field(False, help="write another activation than it reads (set by --writes)", cli=False)
    d_out: int = field(0, help="width of what a transcoder writes (filled in from the activations when 0)",
                       cli=False)
    skip: bool = field(False, help="transcoders: add a learned affine skip connection W_skip x (a skip transcoder)")
    clt_layers: int = field(0, help="a cross-layer transcoder over this many consecutive layers (0: one layer); "
                                    "d_in, d_out, n_features and k are then per layer", cli=False)
    crosscoder: int = field(0, help="a crosscoder over this many hooks side by side (0: one hook): d_in is every "
                                    "hook's width together, each hook scaled on its own in training, and "
                                    "--expansion counts features per dimension of one hook", cli=False)
    expansion: float = field(16.0, help="features per input dimension (F = expansion × D)")
    n_features: int = field(0, help="number of features F (overrides --expansion when > 0; set from "
                                    "expansion × d_in once d_in is known)")
    activation: str = field("topk", help="the kind of SAE: " + ", ".join(activations.NAMES))
    k: int | None = field(None, help="active features per token (" + ", ".join(activations.with_k())
                                   + "; default 32)")
    pre_bias: bool = field(True, help="subtract b_dec from the input before encoding")
    tied: bool = field(False, help="tie the encoder to the decoder (W_enc = W_dec)")
    decoder_norm: str = field("unit", help="unit (constrained to norm 1) or free (penalty × column norm)")
    init_decoder_norm: float = field(0.1, help="norm of the decoder rows at initialisation (free decoders)")
    jumprelu_threshold: float = field(0.5, help="initial JumpReLU threshold (in normalised units; Gemma "
                                                "Scope's 0.001 suits billions of tokens: after 540k, L0 was "
                                                "1,064 from 0.001 and 115 from 0.5)")
    jumprelu_bandwidth: float = field(0.001, help="JumpReLU straight-through bandwidth ε")
    matryoshka: list[int] | None = field(None, help="nested prefix sizes for Matryoshka losses", flag="--prefix")
    normalize: str = field("sqrt_d", help="input scaling during training: sqrt_d (mean norm √D), unit, none")
    select_dtype: str = field("auto", help="precision of the dense encoder pass that picks active features: "
                                           "auto, float32 or bfloat16 (active values are always exact float32)")

    def __post_init__(self) -> None:
        kind = self.kind  # an unknown name is an error naming the registered ones
        if self.transcoder:
            # what it reads and what it writes are different spaces: nothing subtracts the output bias
            # from the input, and no matrix serves as both encoder and decoder
            self.pre_bias = False
            if self.tied:
                raise ConfigError("tied: a transcoder's encoder reads another activation than its decoder writes; "
                                  "it cannot be tied")
        else:
            if self.skip:
                raise ConfigError("skip: applies to transcoders only (--writes another hook than --reads)")
            self.d_out = self.d_in   # an SAE writes what it reads
        check(self.d_out >= 0, "d_out", "a positive width", self.d_out)
        check(self.clt_layers >= 0, "clt_layers", "a layer count >= 0", self.clt_layers)
        if self.clt_layers:
            if not self.transcoder:
                raise ConfigError("clt_layers: a cross-layer transcoder reads each layer's MLP input and writes MLP "
                                  "outputs: it is a transcoder (transcoder=True)")
            for name, why in (("skip", "a skip connection"), ("matryoshka", "Matryoshka prefixes")):
                if getattr(self, name):
                    raise ConfigError(f"{name}: {why} is not supported by cross-layer transcoders")
            if self.activation == "gated":
                raise ConfigError("activation: the Gated SAE's gate loss reconstructs one output; a cross-layer "
                                  "transcoder's features write several: use topk, batchtopk, jumprelu or relu")
        check(self.decoder_norm in ("unit", "free"), "decoder_norm", "unit or free", self.decoder_norm)
        check(self.normalize in ("sqrt_d", "unit", "none"), "normalize", "sqrt_d, unit or none", self.normalize)
        check(self.select_dtype in ("auto", "float32", "bfloat16"), "select_dtype",
              "auto, float32 or bfloat16", self.select_dtype)
        check(self.expansion > 0, "expansion", "a positive number", self.expansion)
        check(self.n_features >= 0, "n_features", "a positive count", self.n_features)
        check(self.d_in >= 0, "d_in", "a positive width", self.d_in)
        check(self.crosscoder >= 0, "crosscoder", "a hook count >= 0", self.crosscoder)
        if self.crosscoder:
            for name, why in (("transcoder", "a crosscoder reconstructs the hooks it reads"),
                              ("tied", "its decoder is rescaled per hook when saved, its encoder is not"),
                              ("clt_layers", "a cross-layer transcoder is another kind")):
                if getattr(self, name):
                    raise ConfigError(f"{name}: not for a crosscoder ({why})")
            if self.d_in % self.crosscoder:
                raise ConfigError(f"d_in: a crosscoder over {self.crosscoder} hooks of one width; {self.d_in} "
                                  "columns do not split evenly")
        if self.d_in and not self.n_features:  # F is resolved as soon as D is known: one name, n_features
            self.n_features = max(1, round(self.expansion * self.d_in / max(1, self.crosscoder)))
        if self.uses_k and self.k is None:
            self.k = 32
        if not self.uses_k and self.k is not None:
            raise ConfigError(f"k: applies to {', '.join(activations.with_k())} only, not {self.activation} "
                              "(its sparsity comes from the penalty coefficient)")
        if self.uses_k:
            assert self.k is not None
            check(self.k >= 1, "k", f"at least 1 for {self.activation}", self.k)
            if self.d_in:
                check(self.k <= self.n_features, "k", f"at most n_features = {self.n_features}", self.k)
        check(self.jumprelu_bandwidth > 0, "jumprelu_bandwidth", "a positive number", self.jumprelu_bandwidth)
        check(self.jumprelu_threshold > 0, "jumprelu_threshold", "a positive number", self.jumprelu_threshold)
        if self.matryoshka is not None and self.d_in:
            sizes = list(self.matryoshka)
            check(all(0 < a < b for a, b in zip(sizes, sizes[1:], strict=False)) and sizes[0] > 0
                  and sizes[-1] <= self.n_features, "matryoshka", f"increasing sizes up to {self.n_features}", sizes)
        kind.check_config(self)

    @property
    def family(self) -> str:
        """What kind of dictionary, in words: SAE, transcoder, crosscoder or cross-layer transcoder."""
        if self.clt_layers:
            return "cross-layer transcoder"
        return "crosscoder" if self.crosscoder else "transcoder" if self.transcoder else "SAE"

    @property
    def kind(self) -> type[Activation]:
        """The registered activation class named by ``activation``."""
        return activations.get(self.activation)

    @property
    def uses_k(self) -> bool:
        return self.kind.uses_k

