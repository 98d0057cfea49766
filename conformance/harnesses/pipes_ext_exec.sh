#!/usr/bin/env bash
# A Pipes conformance harness (conformance/README.md, "The harness contract") in bash, on top of `pipes-ext exec`:
# no Pipes library, only the pipes-ext command and jq. It runs itself under `pipes-ext exec` (which opens and
# closes the session), reads its steps with `pipes-ext extra conformance`, and reports by writing one JSON line
# per message to $PIPES_MESSAGES_FD. The pipes-ext command is $PIPES_EXT_COMMAND (default: pipes-ext).
#   python -m conformance run --capabilities conformance/harnesses/pipes_ext_exec.json -- \
#       bash conformance/harnesses/pipes_ext_exec.sh
set -euo pipefail
read -ra PIPES_EXT <<< "${PIPES_EXT_COMMAND:-pipes-ext}"

if [[ -z "${PIPES_MESSAGES_FD:-}" ]]; then
  # Outside exec: run this script under it. The bootstrap (env, or the CLI arguments in "$@") is exec's to read.
  # `exit` and `crash` steps leave their exit code in $HARNESS_STATE: exec has closed (or not) by then.
  HARNESS_STATE=$(mktemp -d)
  export HARNESS_STATE
  trap 'rm -rf "$HARNESS_STATE"' EXIT
  store=()
  [[ -n "${PIPES_CONFORMANCE_BLOB_STORE:-}" ]] && store=(--blob-store "$PIPES_CONFORMANCE_BLOB_STORE")
  status=0
  "${PIPES_EXT[@]}" exec "${store[@]}" -- bash "$0" "$@" || status=$?
  [[ -f "$HARNESS_STATE/exit" ]] && exit "$(cat "$HARNESS_STATE/exit")"
  exit "$status"
fi

send() { # one message line: a method and its params (a jq program over the step)
  jq -c --arg method "$1" '{method: $method, params: ('"$2"')}' <<< "$step" >&"$PIPES_MESSAGES_FD"
}

steps=$("${PIPES_EXT[@]}" extra conformance | jq -c '.steps[]')
while IFS= read -r step; do
  [[ -z "$step" ]] && continue
  op=$(jq -r .op <<< "$step")
  case "$op" in
    echo_context)
      "${PIPES_EXT[@]}" context | jq -c '{method: "report_custom_message", params: {payload: {context: .}}}' \
        >&"$PIPES_MESSAGES_FD" ;;
    log) send log '{message, level}' ;;
    materialize) send report_asset_materialization '{asset_key, metadata, data_version}' ;;
    check) send report_asset_check '{asset_key, check_name, passed, severity, metadata}' ;;
    custom) send report_custom_message '{payload}' ;;
    custom_many)
      jq -c '{method: "report_custom_message", params: {payload: {seq: range(0; .count)}}}' <<< "$step" \
        >&"$PIPES_MESSAGES_FD" ;;
    custom_big) send report_custom_message '{payload: {size, data: (.char * .size)}}' ;;
    stream) send log_external_stream '{stream, text}' ;;
    print)
      if [[ $(jq -r .stream <<< "$step") == stdout ]]; then jq -j .text <<< "$step"; else jq -j .text <<< "$step" >&2; fi ;;
    exit) jq -r .code <<< "$step" > "$HARNESS_STATE/exit"; exit 0 ;;
    crash) # a crash of the implementation, exec: no closed; what it was handed before is out (pipes-ext sync)
      "${PIPES_EXT[@]}" sync; echo 17 > "$HARNESS_STATE/exit"; kill -KILL "$PPID"; exit 17 ;;
    *) echo "unknown step op \"$op\"" >&2; exit 1 ;;
  esac
done <<< "$steps"
