#!/usr/bin/env bash
# Install the extension into, start, wait for and stop a real WebUI tree made by setup.sh.
#   tools/realwebui/webui.sh install a1111|forge COMMIT [SRC_REPO=/work/main]  # git archive COMMIT → extensions/sd-webui-spm
#   tools/realwebui/webui.sh start   a1111|forge   # offline, CPU, 127.0.0.1; waits until the API answers
#   tools/realwebui/webui.sh stop    a1111|forge
#   tools/realwebui/webui.sh reset   a1111|forge   # forget membranes, outputs, settings and the log of earlier runs
# Ports: a1111 7860, forge 7861. The WebUI's stdout+stderr go to $ROOT/NAME/webui.log.
set -euo pipefail
cmd=$1; name=$2
ROOT=${REALWEBUI_ROOT:-/work/webuis}
dir=$ROOT/$name
ckpt=${REALWEBUI_CKPT:-$ROOT/models/sd15-small-random.safetensors}
case $name in a1111) port=7860 ;; forge) port=7861 ;; *) echo "unknown WebUI $name" >&2; exit 2 ;; esac
pidfile=$dir/webui.pid

common=(--skip-prepare-environment --skip-install --skip-torch-cuda-test --skip-version-check --no-download-sd-model
        --use-cpu all --no-half --precision full --api --server-name 127.0.0.1 --port "$port")
case $name in
  a1111) extra=() ;;
  forge) extra=(--always-cpu) ;;
esac

alive() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case $cmd in
  install)
    commit=$3; src=${4:-/work/main}
    rm -rf "$dir/extensions/sd-webui-spm"
    mkdir -p "$dir/extensions/sd-webui-spm"
    git -C "$src" archive "$commit" | tar -x -C "$dir/extensions/sd-webui-spm"
    git -C "$src" rev-parse "$commit" > "$dir/extensions/sd-webui-spm/.installed_commit"
    echo "installed $(cat "$dir/extensions/sd-webui-spm/.installed_commit") into $dir/extensions/sd-webui-spm"
    ;;
  start)
    if alive; then echo "$name already running (pid $(cat "$pidfile"))"; exit 0; fi
    mkdir -p "$dir/models/Stable-diffusion"
    ln -sfn "$ckpt" "$dir/models/Stable-diffusion/$(basename "$ckpt")"
    # A1111 reads NAME.yaml beside NAME.safetensors (the reduced UNet's shape)
    [ -f "${ckpt%.safetensors}.yaml" ] && ln -sfn "${ckpt%.safetensors}.yaml" "$dir/models/Stable-diffusion/$(basename "${ckpt%.safetensors}").yaml"
    cd "$dir"
    umask 022
    : > "$dir/webui.log"
    # setsid: own process group, so stop can end the launcher and everything it started, by that group id only
    HF_HOME=$ROOT/hf_home HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1 \
    GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${REALWEBUI_THREADS:-2} \
      setsid nice -n 10 "$dir/venv/bin/python" launch.py "${common[@]}" "${extra[@]}" \
      --ckpt "$dir/models/Stable-diffusion/$(basename "$ckpt")" ${REALWEBUI_ARGS:-} >> "$dir/webui.log" 2>&1 < /dev/null &
    echo $! > "$pidfile"
    t0=$(date +%s)
    until curl -sf -o /dev/null "http://127.0.0.1:$port/sdapi/v1/options"; do
      if ! alive; then echo "$name exited during start-up; tail of $dir/webui.log:" >&2; tail -40 "$dir/webui.log" >&2; exit 1; fi
      if (( $(date +%s) - t0 > ${REALWEBUI_START_TIMEOUT:-900} )); then echo "$name not up after timeout" >&2; exit 1; fi
      sleep 3
    done
    echo "$name up on http://127.0.0.1:$port after $(( $(date +%s) - t0 )) s (pid $(cat "$pidfile"))"
    ;;
  stop)
    if alive; then
      pid=$(cat "$pidfile"); kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
      echo "$name stopped"
    fi
    rm -f "$pidfile"
    ;;
  reset)
    alive && { echo "stop $name first" >&2; exit 1; }
    rm -rf "$dir/models/spm" "$dir/outputs" "$dir/config.json" "$dir/ui-config.json" "$dir/cache.json" "$dir/params.txt"
    echo "$name reset"
    ;;
  *) echo "usage: $0 install|start|stop|reset a1111|forge" >&2; exit 2 ;;
esac
