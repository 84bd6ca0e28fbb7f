"""What bench/gpu.sh needs on the GPU machine and cannot get there: run here, before a device run.

    .venv/bin/python bench/gpu_prepare.py        # writes .gpu/smollm2 (git-ignored; carry it)

The GPU machine reaches no network and takes at most 64 MiB of files a call: the default model's
98 MB GGUF does not fit, so its config and tokenizer (a few MB) travel instead, and
bench/harvest.py --random-weights builds SmolLM2-135M's architecture from them (random weights
cost what the trained ones do). Then: run(command="bash bench/gpu.sh", carry=[".gpu"]).
"""

from __future__ import annotations

from pathlib import Path

import dictlens

OUT = Path(__file__).resolve().parents[1] / ".gpu" / "smollm2"


def main() -> None:
    lm = dictlens.load_model("smollm2-135m", device="cpu")
    OUT.mkdir(parents=True, exist_ok=True)
    lm.model.config.save_pretrained(OUT)
    lm.tokenizer.save_pretrained(OUT)
    size = sum(f.stat().st_size for f in OUT.iterdir()) / 2**20
    print(f"wrote {OUT} ({size:.1f} MiB): carry .gpu in the device run")


if __name__ == "__main__":
    main()
