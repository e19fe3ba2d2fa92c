#!/usr/bin/env bash
# Set up a Python environment for SPM's standalone tools (demo, trainer, benchmarks) and, with --dev, its tests.
# Installs into the current python3 (use a venv if you prefer: python3 -m venv .venv && . .venv/bin/activate).
# CPU torch: `pip install torch==2.13.0` (set SPM_TORCH_SPEC to choose another build). Nothing here pulls CUDA torch:
# open_clip_torch (for its CLIP vocabulary file) and stable-diffusion-sdkit (CompVis ldm, for tests) go in --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -vE "^WARNING: (Running pip as|Location)|dependency resolver|requires .*which is not installed|but you have .* which is incompatible|^ERROR: pip's dependency" || true; }

if ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('torch') else 1)"; then
  echo "[setup] installing ${SPM_TORCH_SPEC:-torch==2.13.0}"
  pipi "${SPM_TORCH_SPEC:-torch==2.13.0}"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
# Keep the installed torch: every later install is constrained to it.
CONSTRAINTS=$(mktemp); trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"

# need M...: true when any of the modules cannot be found (find_spec: no slow imports)
need() { ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in sys.argv[1:]) else 1)" "$@"; }
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
if need safetensors transformers diffusers tqdm accelerate gradio PIL; then
  echo "[setup] installing safetensors, transformers, diffusers, tqdm, accelerate, gradio"
  pipi safetensors transformers diffusers tqdm accelerate gradio pillow
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
"$PY" -c "import importlib.metadata as md; print('[setup] ok: ' + ', '.join(f'{k} {md.version(k)}' for k in ('torch', 'diffusers', 'transformers', 'safetensors', 'gradio')))"
