"""The bundle's Helm charts (packaged, with their CRDs as reference) and the container images they
and `--image` name, locked by digest (with skopeo, copied as OCI layouts)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from agencyllm.serving.ops.bundle import verify
from agencyllm.serving.ops.bundle.files import COPY_IGNORE, BuildError, Progress, copy_tree, deterministic_tgz


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
            shutil.copytree(chart_dir, copy, ignore=COPY_IGNORE)
            if meta.get("dependencies"):
                _fetch_subcharts(copy)
            dest.mkdir(parents=True, exist_ok=True)
            archive = dest / f"{name}-{version}.tgz"
            archive.write_bytes(deterministic_tgz(copy, name))
            images = _chart_images(copy, progress)
            if (copy / "crds").is_dir():
                copy_tree(copy / "crds", dest / "crds" / name)
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
