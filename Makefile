# mpidd: `make demo` and `make test` set everything up on a fresh machine (see README.md).
#
#   make test                 MPI from pip (the `mpich` wheel) in .venv; also builds an Open MPI
#                             mpi4py into .venv/openmpi for the Open MPI end-to-end test
#   make test MPI=system      the system's MPI (mpicc and mpiexec on PATH, e.g. after `module load`;
#                             Debian's Open MPI is installed with apt when there is no mpicc),
#                             mpi4py built against it, in .venv-system and build-system
#   make test OPENMPI_TEST=0  leave the Open MPI end-to-end test (and its apt install) out
#   make test SLURM_TEST=0    leave the Slurm suite out (it installs Debian's Slurm and munge with
#                             apt when missing and runs a one-node cluster of its own, as root)
#   make test SUDO=sudo       not root: install Debian packages through sudo (never used unless asked)
#   make test CTEST_ARGS='-R unit'   only some suites (any ctest options)
#   make gpu-check            only the GPU suite, with its report (wall times, accuracies against
#                             the CPU); on a machine without a GPU it says so and skips
#   make docs-figures         run the demo, benchmarks/scaling.py and time_to_accuracy.py again
#                             and write their numbers and figures into README.md, BENCHMARKS.md
#                             and docs/figures (one commit; about 25 minutes on 2 cores)
#
# Not root and no SUDO: nothing is installed with apt and nothing asks for a password; the suites
# that need a Debian package or root (e2e_openmpi without Debian's Open MPI, slurm) are skipped,
# and their reasons printed after CTest's summary. The core suites need only pip.
PYTHON       ?= python3
MPI          ?= pip
SUDO         ?=
CTEST_ARGS   ?=
NP           ?= 4
DATA         ?= data/fashion_mnist.h5
FMNIST_SRC   ?= /usr/share/datasets/fashion-mnist
DEMO_OUT     ?= runs/demo
OPENMPI_TEST ?= 1
SLURM_TEST   ?= 1
MPICC_OPENMPI ?= mpicc.openmpi

ifeq ($(MPI),pip)
VENV         ?= .venv
BUILD        ?= build
MPIEXEC      ?= $(CURDIR)/$(VENV)/bin/mpiexec
MPIEXEC_PREFLAGS ?=
EXTRAS        = test,mpich
else ifeq ($(MPI),system)
VENV         ?= .venv-system
BUILD        ?= build-system
MPICC        ?= mpicc
# Recursive (=) variables: looked up when a recipe runs, i.e. after apt may have installed the MPI.
MPIEXEC      ?= $(or $(shell command -v mpiexec 2>/dev/null),mpiexec)
# Open MPI refuses more ranks than cores (the tests start up to 4 on 2 cores) unless told.
MPIEXEC_PREFLAGS ?= $(if $(shell $(MPIEXEC) --version 2>&1 | grep -i -e 'open mpi' -e openrte),--oversubscribe)
EXTRAS        = test
else
$(error MPI must be pip or system, not "$(MPI)")
endif

# Open MPI refuses to run as root unless told (containers, CI machines); MPICH ignores these.
ifeq ($(shell id -u),0)
export OMPI_ALLOW_RUN_AS_ROOT = 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = 1
endif

PY            = $(VENV)/bin/python
STAMP         = $(VENV)/.installed-$(MPI)
OPENMPI_DIR   = $(VENV)/openmpi
OPENMPI_STAMP = $(OPENMPI_DIR)/.built
CMAKE        := $(shell command -v cmake 2>/dev/null || echo $(VENV)/bin/cmake)
CTEST         = $(dir $(CMAKE))ctest
empty        :=
space        := $(empty) $(empty)

.PHONY: all setup openmpi data demo docs-figures test gpu-check clean

all: test

# $(call apt_install,PACKAGES): apt-get install as root, or through $(SUDO) when given; fails
# (saying why) otherwise, without asking for anything.
apt_install = if ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get here"; false; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1); \
	elif [ -n "$(SUDO)" ]; then \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1); \
	else echo "not root: apt-get needs root (or make ... SUDO=sudo)"; false; fi

ifeq ($(MPI),pip)
# $(VENV) with mpidd, torch, mpi4py + the pip MPICH, h5py, numpy, pytest, pytest-mpi, scikit-learn
# (real digits), at the tested versions of constraints.txt. An mpi4py built for MPI=system in the
# same VENV is replaced.
$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -e $(VENV)/.installed-system ]; then $(PY) -m pip uninstall -y mpi4py; fi
	$(PY) -m pip install -c constraints.txt -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-system
	touch $@
else
# $(VENV) with mpi4py built from source against the system MPI (no pip MPICH), then the rest.
$(STAMP): pyproject.toml setup.py constraints.txt
	@command -v $(MPICC) >/dev/null 2>&1 || { \
	  echo "MPI=system: no $(MPICC) on PATH, installing Debian's Open MPI (openmpi-bin libopenmpi-dev)"; \
	  $(call apt_install,openmpi-bin libopenmpi-dev) || echo "could not install openmpi-bin libopenmpi-dev with apt"; }
	@command -v $(MPICC) >/dev/null 2>&1 || { \
	  echo "error: MPI=system needs an MPI whose $(MPICC) and mpiexec are on PATH (module load ...," \
	       "or as root: apt-get install openmpi-bin libopenmpi-dev); or use the pip MPICH: make MPI=pip"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip uninstall -y mpich
	MPICC="$$(command -v $(MPICC))" $(PY) -m pip install -c constraints.txt --no-binary=mpi4py --no-cache-dir --force-reinstall --no-deps mpi4py
	$(PY) -m pip install -c constraints.txt -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-pip
	touch $@
endif

setup: $(STAMP)

# Debian's Open MPI and an mpi4py built against it in $(OPENMPI_DIR), beside the venv's own:
# PYTHONPATH=$(OPENMPI_DIR) mpirun.openmpi -n 2 $(PY) -m mpidd.train ... runs the same venv
# (torch, h5py, mpidd) under Open MPI. tests/e2e/test_openmpi.py (CTest: e2e_openmpi) does that.
# CFLAGS puts Open MPI's headers first: the build also sees $(VENV)/include, where the pip MPICH
# put its own mpi.h, and Open MPI's wrapper appends its -I after the caller's.
# Without Debian's Open MPI (and no root or SUDO to install it) `make openmpi` fails and `make
# test` goes on: its e2e_openmpi suite is then skipped with the reason.
$(OPENMPI_STAMP): | $(STAMP)
	@command -v $(MPICC_OPENMPI) >/dev/null 2>&1 || { \
	  echo "installing Debian's Open MPI (openmpi-bin libopenmpi-dev) for the Open MPI end-to-end test"; \
	  $(call apt_install,openmpi-bin libopenmpi-dev) || echo "could not install openmpi-bin libopenmpi-dev with apt"; }
	@command -v $(MPICC_OPENMPI) >/dev/null 2>&1 || { \
	  echo "the Open MPI end-to-end test needs Debian's Open MPI ($(MPICC_OPENMPI)): as root (or make ... SUDO=sudo)," \
	       "apt-get install openmpi-bin libopenmpi-dev; or leave that test out: make test OPENMPI_TEST=0"; exit 1; }
	rm -rf $(OPENMPI_DIR)
	MPICC="$$(command -v $(MPICC_OPENMPI))" CFLAGS="$$($(MPICC_OPENMPI) --showme:compile)" \
	  $(PY) -m pip install --no-binary=mpi4py --no-cache-dir --no-deps \
	  --target $(OPENMPI_DIR) "mpi4py==$$($(PY) -c 'import mpi4py; print(mpi4py.__version__)')"
	touch $@

openmpi: $(OPENMPI_STAMP)

$(VENV)/bin/cmake: | $(STAMP)
	$(PY) -m pip install cmake

# Real Fashion-MNIST from Debian's dataset-fashion-mnist package (installed here if apt can).
$(DATA): | $(STAMP)
	@if ! ls $(FMNIST_SRC)/train-images-idx3-ubyte* >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST IDX files)"; \
	  $(call apt_install,dataset-fashion-mnist) || echo "could not install dataset-fashion-mnist with apt"; \
	fi
	@ls $(FMNIST_SRC)/train-images-idx3-ubyte* >/dev/null 2>&1 || { \
	  echo "error: no Fashion-MNIST in $(FMNIST_SRC). Put train-images-idx3-ubyte.gz," \
	       "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz" \
	       "in a directory DIR and run: make demo FMNIST_SRC=DIR"; exit 1; }
	$(PY) -m data_prep.fashion_mnist --src $(FMNIST_SRC) --out $@

data: $(DATA)

demo: $(STAMP) $(DATA)
	$(MPIEXEC) -n $(NP) $(MPIEXEC_PREFLAGS) $(PY) -m mpidd.train --data $(DATA) --out $(DEMO_OUT) --overwrite

docs-figures: $(STAMP) $(DATA)
	$(PY) benchmarks/docs_figures.py --data $(DATA) --out $(DEMO_OUT) --mpirun $(MPIEXEC) \
	    --np $(NP) --preflags "$(MPIEXEC_PREFLAGS)"

# All suites through CTest: unit tests, MPI tests at 1 to 4 ranks, end-to-end runs (and the
# Open MPI end-to-end run unless OPENMPI_TEST=0, the Slurm suite unless SLURM_TEST=0).
# As root a failure to build the Open MPI mpi4py stops make test; not root, e2e_openmpi is then
# skipped. It must pass where its mpi4py was built (the stamp), and is skipped elsewhere. The
# reasons of skipped suites (pytest's SKIPPED lines) are printed after CTest's summary.
test: $(STAMP) $(CMAKE)
	$(if $(filter 1,$(OPENMPI_TEST)),$(if $(filter 0,$(shell id -u)),,-)@$(MAKE) --no-print-directory $(OPENMPI_STAMP))
	$(CMAKE) -S . -B $(BUILD) -DPython3_EXECUTABLE=$(CURDIR)/$(PY) -DMPIEXEC_EXECUTABLE=$(MPIEXEC) \
	  "-DMPIEXEC_PREFLAGS=$(subst $(space),;,$(strip $(MPIEXEC_PREFLAGS)))" \
	  -DMPIDD_REQUIRE_OPENMPI=$$(if [ "$(OPENMPI_TEST)" = 1 ] && [ -e $(OPENMPI_STAMP) ]; then echo ON; else echo OFF; fi) \
	  -DMPIDD_SLURM_TEST=$(if $(filter 1,$(SLURM_TEST)),ON,OFF)
	@status=0; $(CTEST) --test-dir $(BUILD) --output-on-failure $(CTEST_ARGS) </dev/null || status=$$?; \
	  grep -h '^SKIPPED \[' $(BUILD)/Testing/Temporary/LastTest.log 2>/dev/null | sed 's/^/skipped: /' | sort -u; \
	  exit $$status

gpu-check: $(STAMP)
	$(PY) -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
	MPIDD_MPIRUN=$(MPIEXEC) MPIDD_MPIEXEC_PREFLAGS="$(MPIEXEC_PREFLAGS)" $(PY) -m pytest -rs -s tests/gpu

clean:
	rm -rf build build-system
