"""What users install is the built wheel (container images, wheelhouses), not this checkout: build
it, install it into a fresh virtualenv and import every module from there."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import RUNNER_SITE

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("serving", "auth", "quotas", "migrations")
# Imported only by Alembic, with its migration context set up: importing it alone must fail.
NOT_IMPORTABLE_ALONE = {"agencyllm.migrations.env"}


def _setuptools_is_recent() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy: an in-tree build would leave build/ and egg-info behind in the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in (*PACKAGES, "setup.py", "pyproject.toml", "README.md"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    if _setuptools_is_recent():
        command.insert(4, "--no-build-isolation")  # offline: use this environment's setuptools
    subprocess.run(command, check=True, timeout=300)
    (built,) = out.glob("agencyllm-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel; the heavy dependencies (Ray, vLLM, torch) come from this
    environment's site-packages, agencyllm only from the wheel."""
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, system_site_packages=True, with_pip=True)
    python = home / "bin" / "python"
    # The base Python's site-packages may hold none of them (this run's are a project venv's).
    [site_dir] = (home / "lib").glob("python3*/site-packages")
    (site_dir / "zz-test-runner.pth").write_text("\n".join(RUNNER_SITE) + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300
    )
    return python


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_holds_every_module_and_package_data(wheel):
    names = _wheel_names(wheel)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    missing = []
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(ROOT / top)
            wanted = path.suffix == ".py"
            for package, patterns in package_data.items():
                # A package-data pattern is relative to its package's folder ("templates/*").
                folder = Path(*package.split(".")[1:])
                inside = path.relative_to(ROOT).is_relative_to(folder)
                if inside and any(fnmatch.fnmatch(str(path.relative_to(ROOT / folder)), p) for p in patterns):
                    wanted = True
            if wanted and f"agencyllm/{top}/{relative}" not in names:
                missing.append(f"agencyllm/{top}/{relative}")
    assert missing == []
    # The files the migrations need at run time, named explicitly.
    assert {
        "agencyllm/migrations/alembic.ini",
        "agencyllm/migrations/script.py.mako",
        "agencyllm/migrations/versions/0001_initial.py",
        "agencyllm/serving/admin/__init__.py",
    } <= names
    assert not any(n.startswith(("tests/", "infra/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "agencyllm = agencyllm.serving.cli.main:main" in archive.read(entry_points).decode()


def test_installed_wheel_imports_every_module(installed, tmp_path):
    script = tmp_path / "imports.py"
    script.write_text(
        "import importlib, json, pkgutil, sys\n"
        "import agencyllm.serving, agencyllm.auth, agencyllm.quotas, agencyllm.migrations\n"
        f"skip = {sorted(NOT_IMPORTABLE_ALONE)!r}\n"
        "names = []\n"
        "for top in (agencyllm.serving, agencyllm.auth, agencyllm.quotas, agencyllm.migrations):\n"
        "    names.append(top.__name__)\n"
        "    names += [m.name for m in pkgutil.walk_packages(top.__path__, top.__name__ + '.') if m.name not in skip]\n"
        "files = {n: importlib.import_module(n).__file__ for n in names}\n"
        "from agencyllm.serving.rayserve.app import build_app, application_config\n"
        "print(json.dumps(files))\n"
    )
    # Run outside the checkout so nothing can be picked up from the working directory.
    done = subprocess.run(
        [str(installed), str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = json.loads(done.stdout.strip().splitlines()[-1])
    site = str(installed.parent.parent)
    elsewhere = {name: path for name, path in files.items() if not path.startswith(site)}
    assert elsewhere == {}, "imported from outside the wheel's virtualenv"
    expected = {
        "agencyllm.serving.rayserve.app",
        "agencyllm.serving.admin.tenants",
        "agencyllm.serving.ops.cluster_init",
        "agencyllm.quotas.ledger",
        "agencyllm.auth.oidc",
        "agencyllm.migrations.versions",
    }
    assert expected <= set(files)


def test_installed_wheel_runs_the_cli(installed, tmp_path):
    agencyllm = installed.parent / "agencyllm"
    done = subprocess.run(
        [str(agencyllm), "db", "wait", "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0 and "--timeout" in done.stdout
    done = subprocess.run(
        [str(agencyllm), "model", "placeholder", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").is_file()
