# agentforge developer commands. Everything runs inside a virtualenv ($(VENV)), created on
# first use, so a fresh machine needs only python3 (>= 3.10), a C++17 compiler and make.
#
#   make install   venv + torch (only if absent) + build tools + agentforge[pipeline,test,lint], non-editable
#   make test      the fast test suite (the README's test command)
#   make run       agentforge run on the tiny preset (the phases that exist), then where its report is
#   make bench     the pytest-benchmark suites in benchmarks/
#   make clean     build outputs and caches (keeps $(VENV); `make distclean` removes it too)
#
# Variables: PYTHON (interpreter that creates the venv), VENV, TORCH_VERSION, TORCH_INDEX, EXTRAS, JOBS,
# VERBOSE, RUN_DIR, RUN_ARGS.

PYTHON        ?= python3
VENV          ?= .venv
# The extension is compiled against this torch and runs only with it (same minor version).
TORCH_VERSION ?= 2.13.0
# Where torch comes from. PyPI's Linux torch is the CUDA build (several GB with its nvidia-*
# packages, whatever the version pin); on a machine without an NVIDIA GPU the CPU build comes
# from PyTorch's CPU index (its 2.13.0+cpu sorts above PyPI's 2.13.0, so pip takes it). With a
# GPU, or to use only pip's own configuration (a local wheel directory, a mirror), set it empty:
# `make install TORCH_INDEX=`.
# The default: the CPU index when there is no nvidia-smi and the index resolves (else pip's own
# configuration, e.g. a local wheel directory on a machine with no route to it).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX   ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,$(if $(shell getent hosts download.pytorch.org 2>/dev/null),$(TORCH_CPU_INDEX)))
EXTRAS        ?= pipeline,test,lint
# VERBOSE=1: show the compiler's progress (the C++ build takes a few minutes on 2 cores)
VERBOSE       ?=
JOBS          ?= $(shell nproc 2>/dev/null || echo 2)
BENCH_ARGS    ?=
PYTEST_ARGS   ?=
# `make run` starts RUN_DIR, or resumes it when it already holds a run (after Ctrl-C, kill -9, ...).
RUN_DIR       ?= runs/tiny
RUN_ARGS      ?= --preset tiny

PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
STAMP := $(VENV)/.agentforge-installed

export HF_HUB_OFFLINE := 1
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(JOBS)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# Reinstall when any build input changes (the install is non-editable).
SOURCES := pyproject.toml CMakeLists.txt $(shell find cmake csrc python -type f \
             \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \
                -o -name '*.cmake' \) 2>/dev/null)

.PHONY: install test run bench clean distclean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(SOURCES) | $(PY)
	@if $(PY) -c 'import torch' 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed in $(VENV)"; \
	else \
	  $(PIP) install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)); \
	fi
	@if $(PY) -c 'import scikit_build_core, ninja, pybind11' 2>/dev/null; then \
	  echo "build tools already installed in $(VENV)"; \
	else \
	  $(PIP) install scikit-build-core ninja pybind11; \
	fi
	@v=$$(cmake --version 2>/dev/null | head -n1 | awk '{print $$3}'); \
	if [ -n "$$v" ] && [ "$$(printf '%s\n' 3.25 "$$v" | sort -V | head -n1)" = 3.25 ]; then \
	  echo "cmake $$v found"; \
	elif $(PY) -c 'import cmake' 2>/dev/null; then \
	  echo "cmake from $(VENV)"; \
	else \
	  $(PIP) install "cmake>=3.25"; \
	fi
	@echo "building the C++ extension (a few minutes on 2 cores; VERBOSE=1 shows the compiler)"
	$(PIP) install --no-build-isolation $(if $(VERBOSE),-v -Cbuild.verbose=true) ".[$(EXTRAS)]"
	@touch $@

test: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow and not gpu" $(PYTEST_ARGS)

run: $(STAMP)
	@if [ -f $(RUN_DIR)/run.json ]; then \
	  $(VENV)/bin/agentforge run --resume $(RUN_DIR); \
	else \
	  $(VENV)/bin/agentforge run $(RUN_ARGS) --out $(RUN_DIR); \
	fi
	@echo "open $(RUN_DIR)/report.html; models: $(VENV)/bin/agentforge models $(RUN_DIR)"

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-only $(PYTEST_ARGS)

# build/editable belongs to an editable install (its _C is loaded from there): left alone.
clean:
	rm -rf build/cp* dist .pytest_cache .benchmarks .hypothesis $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
