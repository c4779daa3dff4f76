"""The files of a bundle, written so that the same inputs give the same bytes: copied trees and
models, deterministic archives, split parts, the manifest and its signature; and `BuildError`,
what every build step raises (one line for the user)."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from agencyllm.serving.ops.bundle import verify

Progress = Callable[[str], None]
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.retry", ".pytest_cache", "credentials", ".ansible")


class BuildError(Exception):
    """One line for the user."""


def copy_models(models: dict[str, Path], dest: Path, progress: Progress) -> list[dict]:
    copied = []
    for model_id, directory in sorted(models.items()):
        target = dest / model_id
        files = copy_tree(directory, target)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        progress(f"    {model_id}: {files['files']} files, {size / 1e6:.1f} MB")
        copied.append({"id": model_id, "path": f"models/{model_id}", "files": files["files"], "bytes": size})
    return copied


def copy_tree(source: Path, dest: Path) -> dict:
    if not source.is_dir():
        return {"files": 0}
    for path in source.rglob("*"):
        if path.is_symlink() and not path.resolve().is_relative_to(source.resolve()):
            raise BuildError(f"{path} is a symlink out of {source}: copy the real file in")
    shutil.copytree(source, dest, ignore=COPY_IGNORE, symlinks=False)
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
