"""Shared fixtures: tiny random-weight models of three architectures, and the real default model.

Tiny models are saved to disk with ``save_pretrained`` and loaded back through
``dictlens.load_model``, so the tests run the same loading path users do. Their tokenizer
is a small byte-level BPE trained here on the default corpus.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("llama", "gpt2", "gpt_neox")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from dictlens.data.text import default_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(default_documents()[:300], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def _config(arch: str, vocab: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=256, **common)
    return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         max_position_embeddings=256, **common)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    dirs = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(arch, len(tiny_tokenizer)))
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs):
    from dictlens import load_model

    return {arch: load_model(str(path), device="cpu") for arch, path in tiny_model_dirs.items()}


@pytest.fixture
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def smollm2():
    from dictlens import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small text file of real English (the first default documents)."""
    from dictlens.data.text import default_documents

    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(default_documents()[:40]))
    return path


@pytest.fixture
def analysed_run(tiny_model_dirs, corpus, tmp_path: Path) -> Path:
    """A TopK SAE (F = 64) trained through the command line on the tiny Llama's resid_post.1,
    with its analysis (RUN/analysis) over the corpus."""
    from dictlens.cli import main

    model, acts, run = str(tiny_model_dirs["llama"]), tmp_path / "acts", tmp_path / "run"
    assert main(["harvest", "--model", model, "--hook", "resid_post.1", "--text", str(corpus), "--tokens", "3000",
                 "--context", "64", "--out", str(acts)]) == 0
    assert main(["train", "--acts", str(acts), "--k", "4", "--expansion", "2", "--tokens", "4096",
                 "--batch-size", "256", "--no-plots", "--out", str(run)]) == 0
    assert main(["analyze", str(run), "--text", str(corpus), "--tokens", "1500", "--context", "64",
                 "--no-report"]) == 0
    return run


def interrupted(monkeypatch: pytest.MonkeyPatch, run, at: int = 17) -> None:
    """``run()`` with ``Trainer.step`` raising KeyboardInterrupt at its ``at``-th call (Ctrl-C mid-run:
    the trainer checkpoints before it stops); the real step is back afterwards."""
    from dictlens.train import trainer as trainer_mod

    real_step = trainer_mod.Trainer.step
    calls = {"n": 0}

    def interrupting(self, x, **kw):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real_step(self, x, **kw)

    monkeypatch.setattr(trainer_mod.Trainer, "step", interrupting)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(trainer_mod.Trainer, "step", real_step)
