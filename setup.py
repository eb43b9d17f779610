"""mpidd's metadata, dependencies and entry points are in pyproject.toml; this file only lets
setuptools be called the old way (python setup.py ..., pip install -e with an old pip)."""

from setuptools import setup

setup()
