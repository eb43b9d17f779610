# mpidd: `make demo` and `make test` set everything up on a fresh machine (see README.md).
PYTHON     ?= python3
VENV       ?= .venv
NP         ?= 4
DATA       ?= data/fashion_mnist.h5
FMNIST_SRC ?= /usr/share/datasets/fashion-mnist
DEMO_OUT   ?= runs/demo
MPIEXEC    ?= $(CURDIR)/$(VENV)/bin/mpiexec
PY          = $(VENV)/bin/python
STAMP       = $(VENV)/.installed
CMAKE      := $(shell command -v cmake 2>/dev/null || echo $(VENV)/bin/cmake)
CTEST       = $(dir $(CMAKE))ctest

.PHONY: all setup data demo test clean

all: test

# .venv with mpidd, torch==2.13.0, mpi4py + the pip MPICH, h5py, numpy, pytest, pytest-mpi, scikit-learn (real digits)
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(STAMP)

$(VENV)/bin/cmake: | $(STAMP)
	$(PY) -m pip install cmake

# Real Fashion-MNIST from Debian's dataset-fashion-mnist package (installed here if apt can).
$(DATA): | $(STAMP)
	@if ! ls $(FMNIST_SRC)/train-images-idx3-ubyte* >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST IDX files)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
	      || echo "could not install dataset-fashion-mnist with apt"; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
	      || echo "could not install dataset-fashion-mnist with apt"; \
	  fi; \
	fi
	@ls $(FMNIST_SRC)/train-images-idx3-ubyte* >/dev/null 2>&1 || { \
	  echo "error: no Fashion-MNIST in $(FMNIST_SRC). Put train-images-idx3-ubyte.gz," \
	       "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz" \
	       "in a directory DIR and run: make demo FMNIST_SRC=DIR"; exit 1; }
	$(PY) -m data_prep.fashion_mnist --src $(FMNIST_SRC) --out $@

data: $(DATA)

demo: $(STAMP) $(DATA)
	$(MPIEXEC) -n $(NP) $(PY) -m mpidd.train --data $(DATA) --out $(DEMO_OUT) --overwrite

# All suites through CTest: unit tests, MPI tests at 1, 2 and 4 ranks, end-to-end runs.
test: $(STAMP) $(CMAKE)
	$(CMAKE) -S . -B build -DPython3_EXECUTABLE=$(CURDIR)/$(PY) -DMPIEXEC_EXECUTABLE=$(MPIEXEC)
	$(CTEST) --test-dir build --output-on-failure

clean:
	rm -rf build
