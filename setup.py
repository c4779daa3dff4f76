"""Package discovery: each top-level folder installs as `agencyllm.<folder>`, subpackages included.

pyproject.toml holds all metadata; this file only lists packages, because setuptools' `find`
cannot map several source folders under one namespace.
"""

from setuptools import find_packages, setup

TOPS = ("serving", "auth", "quotas", "migrations")

setup(
    package_dir={f"agencyllm.{top}": top for top in TOPS},
    packages=[f"agencyllm.{name}" for name in find_packages(include=[f"{t}" for t in TOPS] + [f"{t}.*" for t in TOPS])],
)
