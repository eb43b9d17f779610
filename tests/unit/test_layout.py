"""The package's shape, as docs/methods.md describes it to a newcomer: modules small enough to
read, the pure modules free of MPI (only mpidd.parallel imports mpi4py), no folder that tools
skip as build output."""

import os
import subprocess
import sys

from conftest import ROOT

MAX_MODULE_LINES = 450
PACKAGE = os.path.join(ROOT, "mpidd")


def modules():
    """{dotted name: path} of every module of mpidd."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                found[name] = path
    return found


def test_no_module_is_over_the_readable_size():
    sizes = {name: sum(1 for _ in open(path)) for name, path in modules().items()}
    assert len(sizes) > 20, sizes
    too_long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"split these modules (at most {MAX_MODULE_LINES} lines): {too_long}"


def test_no_folder_is_named_like_build_output():
    # ruff, black and others skip any folder named dist or build: code there would not be linted
    for folder, dirs, _ in os.walk(PACKAGE):
        assert not {"dist", "build"} & set(dirs), folder


# the public API and the entry points use MPI (through mpidd.parallel); every other top-level
# module, and methods.context, is the pure core
USES_MPI = ("mpidd.api", "mpidd.dense_estimator", "mpidd.estimator", "mpidd.online_estimator", "mpidd.train",
            "mpidd.predict", "mpidd.report")


def test_only_the_parallel_package_imports_mpi4py():
    importing = sorted(name for name, path in modules().items()
                       if any(line.lstrip().startswith(("import mpi4py", "from mpi4py")) for line in open(path)))
    # mpidd.train imports it first on purpose: MPI_Init before torch (see its docstring)
    assert importing and all(n.startswith("mpidd.parallel") or n == "mpidd.train" for n in importing), importing


def test_the_pure_modules_load_no_mpi():
    """Import every pure module in one fresh process: mpi4py must not be loaded."""
    names = sorted(n for n, path in modules().items() if n.count(".") == 1 and n not in USES_MPI
                   and not path.endswith("__init__.py")) + ["mpidd.methods.context"]
    assert "mpidd.engine" in names and "mpidd.sklearn_conventions" in names and "mpidd.decomposition" in names
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'mpi4py' not in sys.modules, name\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
