#!/usr/bin/env bash
# One acceptance run: for each WebUI in turn (never two at once), install COMMIT of SRC_REPO as the extension,
# forget earlier membranes/settings, start, drive with Playwright, stop; then write the markdown report.
#   tools/realwebui/run.sh COMMIT [SRC_REPO=/work/main] [WEBUIS="forge a1111"]
# Results: /tmp/realwebui_<webui>_<commit>.json, screenshots /tmp/realwebui_shots/<commit>_<webui>/,
# the report $REPORT (default /tmp/realwebui_<commit>.md).
set -uo pipefail
commit=$1; src=${2:-/work/main}; webuis=${3:-${WEBUIS:-forge a1111}}
here=$(cd "$(dirname "$0")" && pwd)
ROOT=${REALWEBUI_ROOT:-/work/webuis}
short=$(git -C "$src" rev-parse --short "$commit")
report=${REPORT:-/tmp/realwebui_$short.md}
jsons=()
for w in $webuis; do
  case $w in a1111) port=7860 ;; forge) port=7861 ;; esac
  # one WebUI at a time, unless REALWEBUI_PARALLEL=1 (two run.sh, one per WebUI, when time is short)
  if [ "${REALWEBUI_PARALLEL:-0}" != 1 ]; then
    for o in a1111 forge; do [ "$o" != "$w" ] && bash "$here/webui.sh" stop "$o" >/dev/null; done
  fi
  bash "$here/webui.sh" stop "$w"
  bash "$here/webui.sh" reset "$w"
  bash "$here/webui.sh" install "$w" "$commit" "$src"
  out=/tmp/realwebui_${w}_$short.json
  jsons+=("$out")
  if ! bash "$here/webui.sh" start "$w"; then
    echo "{\"webui\": \"$w\", \"meta\": {\"extension_commit\": \"$commit\"}, \"items\": {\"start\": {\"status\": \"fail\", \"evidence\": \"the WebUI did not start; see $ROOT/$w/webui.log\"}}}" > "$out"
    continue
  fi
  nice -n 5 python3 "$here/drive.py" --webui "$w" --url "http://127.0.0.1:$port" --root "$ROOT/$w" \
    --reference "$ROOT/ref_$w.png" --out "$out" --shots "/tmp/realwebui_shots/${short}_$w" \
    --budget "${REALWEBUI_BUDGET:-2400}" --job-limit "${REALWEBUI_JOB_LIMIT:-900}" \
    --interrupt-wait "${REALWEBUI_INTERRUPT_WAIT:-600}" ${REALWEBUI_TAB_PREVIEW_STEPS:+--tab-preview-steps "$REALWEBUI_TAB_PREVIEW_STEPS"}
  cp "$ROOT/$w/webui.log" "/tmp/realwebui_${w}_$short.webui.log"
  bash "$here/webui.sh" stop "$w"
  python3 "$here/report.py" "${jsons[@]}" > "$report"
done
python3 "$here/report.py" "${jsons[@]}" > "$report"
echo "report: $report"
