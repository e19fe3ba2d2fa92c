#!/usr/bin/env bash
# Make the venv of one WebUI tree with the torch/torchvision pair its launcher pins and its
# requirements_versions.txt, from PyPI. The system python is never touched.
#   tools/realwebui/make_venv.sh a1111|forge [WEBUIS_ROOT=/work/webuis]
# The PyPI torch wheels for Linux are CUDA builds; they run on the CPU with --use-cpu all.
set -euo pipefail
name=$1; root=${2:-/work/webuis}; dir=$root/$name
py=${REALWEBUI_PYTHON:-/root/.pyenv/versions/3.10.13/bin/python3}
case $name in
  a1111) torch_pair="torch==2.1.2 torchvision==0.16.2" ;;   # modules/launch_utils.py of v1.10.1
  forge) torch_pair="torch==2.3.1 torchvision==0.18.1" ;;   # modules/launch_utils.py of Forge
  *) echo "usage: $0 a1111|forge" >&2; exit 2 ;;
esac
[ -d "$dir/venv" ] || "$py" -m venv "$dir/venv"
pip="nice -n 10 $dir/venv/bin/python -m pip"
$pip install -q --upgrade pip wheel
$pip install $torch_pair
$pip install -r "$dir/requirements_versions.txt"
# Forge's modules/paths.py puts repositories/huggingface_guess on sys.path itself: nothing to install for it.
"$dir/venv/bin/python" -c "import torch, torchvision; print('venv ok', torch.__version__, torchvision.__version__)"
