#!/usr/bin/env python3
"""Verify an agencyllm bundle: standard library only, so it runs before anything is installed.

    python3 verify.py BUNDLE_DIR [--allowed-signers FILE] [--join]

Checks every line of `MANIFEST.sha256` (a file `sha256sum -c` also reads), that no listed file is
missing and no unlisted file is present, and, given an allowed-signers file, the `ssh-keygen -Y`
signature `MANIFEST.sha256.sig` (namespace `agencyllm-bundle`). Files split for removable media
(`NAME.part-000`, ...) verify as parts; `--join` reassembles them, checks the whole file against
`SPLIT.sha256` and removes the parts. Exit status 0 only when everything matches; each problem is
printed on its own line, naming the file.

`agencyllm bundle verify` runs this same module; the bundle ships a copy as `verify.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MANIFEST = "MANIFEST.sha256"
SIGNATURE = "MANIFEST.sha256.sig"
SPLIT = "SPLIT.sha256"
NAMESPACE = "agencyllm-bundle"
# Not covered by the manifest: the manifest itself and its detached signature.
UNLISTED = frozenset({MANIFEST, SIGNATURE})
PART = re.compile(r"^(?P<whole>.+)\.part-(?P<index>\d{3})$")
_LINE = re.compile(r"^(?P<digest>[0-9a-f]{64}) [ *](?P<path>.+)$")
CHUNK = 1 << 20


class BundleError(Exception):
    """The bundle does not verify; `problems` names every file at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def parse_manifest(text: str, name: str = MANIFEST) -> dict[str, str]:
    """`{relative path: sha256}` from `sha256sum` output; refuses paths that leave the bundle."""
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            raise BundleError([f"{name} line {number}: not '<sha256>  <path>'"])
        path = match["path"]
        parts = path.split("/")
        if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
            raise BundleError([f"{name} line {number}: unsafe path {path!r}"])
        if path in entries:
            raise BundleError([f"{name} line {number}: {path} listed twice"])
        entries[path] = match["digest"]
    return entries


def bundle_files(root: Path) -> set[str]:
    """Every regular file under root, as manifest paths. Symlinks count as files (and never verify)."""
    found: set[str] = set()
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(directory)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            found.add((base / name).relative_to(root).as_posix())
    return found


def _split_table(root: Path, entries: dict[str, str]) -> dict[str, str]:
    if SPLIT not in entries or not (root / SPLIT).is_file():
        return {}
    return parse_manifest((root / SPLIT).read_text(encoding="utf-8"), SPLIT)


def check(root: Path, *, allowed_signers: Path | None = None, progress=None) -> dict[str, str]:
    """Verify `root`; returns the manifest entries. Raises BundleError listing every problem."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise BundleError([f"{MANIFEST}: missing: {root} is not an agencyllm bundle (or not all of it was copied)"])
    manifest_bytes = manifest.read_bytes()
    problems: list[str] = []
    if allowed_signers is not None:
        problems += verify_signature(root, manifest_bytes, Path(allowed_signers))
    entries = parse_manifest(manifest_bytes.decode("utf-8"))
    split = _split_table(root, entries)
    present = bundle_files(root)

    joined_ok: set[str] = set()
    for whole, digest in split.items():
        path = root / whole
        if whole in present and path.is_file() and not path.is_symlink():
            if sha256_file(path) == digest:
                joined_ok.add(whole)
            else:
                problems.append(f"{whole}: checksum mismatch (joined file differs from {SPLIT})")

    total = len(entries)
    for done, (relative, digest) in enumerate(sorted(entries.items()), 1):
        path = root / relative
        part = PART.match(relative)
        if relative not in present:
            if part and part["whole"] in joined_ok:
                continue
            problems.append(f"{relative}: missing")
            continue
        if path.is_symlink() or not path.is_file():
            problems.append(f"{relative}: not a regular file")
            continue
        if sha256_file(path) != digest:
            problems.append(f"{relative}: checksum mismatch")
        if progress is not None:
            progress(done, total, relative)

    for extra in sorted(present - set(entries) - UNLISTED - joined_ok):
        problems.append(f"{extra}: not in {MANIFEST} (extra file)")
    if problems:
        raise BundleError(problems)
    return entries


def verify_signature(root: Path, manifest_bytes: bytes, allowed_signers: Path) -> list[str]:
    """`ssh-keygen -Y verify` of the manifest against the agency's allowed-signers file."""
    signature = root / SIGNATURE
    if not allowed_signers.is_file():
        return [f"{allowed_signers}: allowed-signers file not found"]
    if not signature.is_file():
        return [f"{SIGNATURE}: missing (the bundle is not signed)"]
    if shutil.which("ssh-keygen") is None:
        return ["ssh-keygen not found: install OpenSSH to check the signature"]
    found = subprocess.run(
        ["ssh-keygen", "-Y", "find-principals", "-s", str(signature), "-f", str(allowed_signers)],
        capture_output=True,
        text=True,
    )
    principals = [line.strip() for line in found.stdout.splitlines() if line.strip()]
    if found.returncode != 0 or not principals:
        return [f"{SIGNATURE}: signature does not verify: signed by a key not in {allowed_signers.name}"]
    checked = subprocess.run(
        [
            "ssh-keygen",
            "-Y",
            "verify",
            "-f",
            str(allowed_signers),
            "-I",
            principals[0],
            "-n",
            NAMESPACE,
            "-s",
            str(signature),
        ],
        input=manifest_bytes,
        capture_output=True,
    )
    if checked.returncode != 0:
        reason = (checked.stderr or checked.stdout).decode(errors="replace").strip().splitlines()
        return [
            f"{SIGNATURE}: signature does not verify against {MANIFEST} ({reason[-1] if reason else 'no reason given'})"
        ]
    return []


def join_parts(root: Path) -> list[str]:
    """Reassemble split files (after a full check); returns the files joined."""
    root = Path(root)
    entries = check(root)
    split = _split_table(root, entries)
    joined = []
    for whole, digest in sorted(split.items()):
        parts = sorted(p for p in entries if (m := PART.match(p)) and m["whole"] == whole)
        if not parts or not (root / parts[0]).exists():
            continue  # already joined (check() confirmed its digest)
        target = root / whole
        temporary = target.with_name(target.name + ".joining")
        with open(temporary, "wb") as out:
            for part in parts:
                with open(root / part, "rb") as handle:
                    shutil.copyfileobj(handle, out, CHUNK)
        if sha256_file(temporary) != digest:
            temporary.unlink()
            raise BundleError([f"{whole}: checksum mismatch after joining {len(parts)} parts"])
        temporary.replace(target)
        for part in parts:
            (root / part).unlink()
        joined.append(whole)
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="verify.py", description="Verify an agencyllm bundle (standard library only)."
    )
    parser.add_argument("bundle", type=Path, help="bundle directory")
    parser.add_argument("--allowed-signers", type=Path, help="ssh allowed-signers file: also check the signature")
    parser.add_argument("--join", action="store_true", help="after verifying, reassemble files split for media")
    parser.add_argument("--quiet", action="store_true", help="print problems only")
    args = parser.parse_args(argv)
    last = {"at": time.monotonic()}

    def progress(done: int, total: int, name: str) -> None:
        if not args.quiet and time.monotonic() - last["at"] >= 2:  # large bundles: a line every 2 s
            print(f"  verified {done}/{total} files ({name})", flush=True)
            last["at"] = time.monotonic()

    try:
        entries = check(args.bundle, allowed_signers=args.allowed_signers, progress=progress)
        if args.join:
            for whole in join_parts(args.bundle):
                print(f"  joined {whole}")
    except BundleError as exc:
        for problem in exc.problems:
            print(f"FAILED {problem}", file=sys.stderr)
        print(
            f"Bundle {args.bundle} does NOT verify: {len(exc.problems)} problem(s). Install nothing from it.",
            file=sys.stderr,
        )
        return 1
    signed = " and its signature" if args.allowed_signers else ""
    if not args.allowed_signers and (args.bundle / SIGNATURE).exists():
        print(f"  {SIGNATURE} present but not checked: pass --allowed-signers FILE to check it")
    print(f"Bundle {args.bundle} verified: {len(entries)} files{signed} match {MANIFEST}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
