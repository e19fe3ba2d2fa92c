#!/usr/bin/env bash
# Set up a Python environment for SPM's standalone tools (demo, trainer, benchmarks) and, with --dev, its tests.
#
#   bash tools/setup.sh          # the tools, in .venv (made with `python3 -m venv .venv` if missing, reused if present)
#   bash tools/setup.sh --dev    # + the test tools;  --e2e: + Playwright and Debian's chromium (browser tests)
#
# Everything goes into .venv at the repository root, never into the system's python3. PYTHON=/path/to/python
# installs into that interpreter instead (e.g. a venv of your own); SPM_VENV=DIR puts the venv elsewhere.
# CPU torch: `pip install torch==2.13.0` (set SPM_TORCH_SPEC to choose another build). Nothing here pulls CUDA torch:
# open_clip_torch (for its CLIP vocabulary file) and stable-diffusion-sdkit (CompVis ldm, for tests) go in --no-deps.
# Idempotent: a second run checks what is there (no imports of torch) and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
else
  VENV=${SPM_VENV:-.venv}
  if [[ ! -x "$VENV/bin/python" ]]; then
    BASE=${SPM_BASE_PYTHON:-python3}
    echo "[setup] making a virtual environment in $VENV ($("$BASE" --version 2>&1))"
    if ! "$BASE" -m venv "$VENV" 2>/tmp/spm-venv.$$.err; then
      rm -rf "$VENV"
      echo "[setup] error: '$BASE -m venv' does not work here: $(tail -n 1 /tmp/spm-venv.$$.err)" >&2
      rm -f /tmp/spm-venv.$$.err
      echo "[setup] install Python's venv module (Debian/Ubuntu: apt-get install python3-venv), or run" >&2
      echo "[setup]   PYTHON=/path/to/python bash tools/setup.sh   to install into an interpreter you choose" >&2
      exit 1
    fi
    rm -f /tmp/spm-venv.$$.err
  fi
  PY="$VENV/bin/python"
fi
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -vE "^WARNING: (Running pip as|Location)|dependency resolver|requires .*which is not installed|but you have .* which is incompatible|^ERROR: pip's dependency" || true; }
# need M...: true when any of the modules cannot be found (find_spec: no slow imports)
need() { ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)" "$@"; }

# numpy with (not after) torch: torch imported without numpy prints "Failed to initialize NumPy"
if need torch; then
  echo "[setup] installing ${SPM_TORCH_SPEC:-torch==2.13.0} and numpy"
  pipi numpy "${SPM_TORCH_SPEC:-torch==2.13.0}"
elif need numpy; then
  echo "[setup] installing numpy (beside the torch that is there)"
  pipi numpy
fi
# torch's version from its metadata: importing torch here would be slow (and noisy before numpy is there)
TORCH_VERSION=$("$PY" -c "import importlib.metadata as md; print(md.version('torch').split('+')[0])")
# Keep the installed torch: every later install is constrained to it.
CONSTRAINTS=$(mktemp); trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"

# The versions Forge pins (gradio 4.40, transformers 4.46.1, diffusers 0.31): the standalone tools and the
# tests run on what WebUI users actually have. Set SPM_UNPINNED=1 to keep whatever is installed.
PINS=(gradio==4.40.0 transformers==4.46.1 diffusers==0.31.0 huggingface_hub==0.26.2 fastapi==0.112.4 pydantic==2.8.2 "tokenizers<0.21")
pinned_ok() {
  "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
want = {"gradio": "4.40.0", "transformers": "4.46.1", "diffusers": "0.31.0", "huggingface_hub": "0.26.2", "fastapi": "0.112.4",
        "pydantic": "2.8.2"}
sys.exit(0 if all(md.version(k) == v for k, v in want.items()) else 1)
PYEOF
}
if [[ "${SPM_UNPINNED:-0}" != "1" ]] && ! pinned_ok; then
  echo "[setup] installing ${PINS[*]}"
  pipi "${PINS[@]}"
fi
if need safetensors transformers diffusers tqdm accelerate gradio PIL tokenizers; then
  echo "[setup] installing safetensors, transformers, diffusers, tqdm, accelerate, gradio"
  pipi safetensors transformers diffusers tqdm accelerate gradio pillow tokenizers
fi
if ! "$PY" -c "import importlib.util as u; s=u.find_spec('open_clip'); import os,sys; sys.exit(0 if s and os.path.exists(os.path.join(list(s.submodule_search_locations)[0],'bpe_simple_vocab_16e6.txt.gz')) else 1)"; then
  echo "[setup] installing open_clip_torch --no-deps (CLIP BPE vocabulary)"
  pipi --no-deps open_clip_torch
fi
if [[ "${1:-}" == "--dev" || "${1:-}" == "--e2e" ]]; then
  if need pytest hypothesis ruff einops omegaconf; then
    echo "[setup] installing test tools"
    pipi pytest hypothesis ruff einops omegaconf
  fi
  if need ldm; then
    echo "[setup] installing stable-diffusion-sdkit --no-deps (CompVis ldm UNet for structural tests)"
    pipi --no-deps stable-diffusion-sdkit
  fi
fi
if [[ "${1:-}" == "--e2e" || "${2:-}" == "--e2e" ]]; then
  # browser tests (marked slow): Playwright's Python package drives Debian's Chromium (no browser download)
  need playwright && pipi playwright==1.65.2
  if [[ ! -x /usr/bin/chromium ]]; then
    echo "[setup] installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "[setup] chromium not installed: browser tests will skip"
  fi
fi
"$PY" -c "import importlib.metadata as md, sys; print(f'[setup] ok: {sys.executable}: ' + ', '.join(f'{k} {md.version(k)}' for k in ('torch', 'numpy', 'diffusers', 'transformers', 'safetensors', 'gradio')))"
