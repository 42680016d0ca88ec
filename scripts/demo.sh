#!/usr/bin/env bash
# The demo: start guest-envd (the static binary that goes into images) on a Unix socket, deliver /init
# with instance env and a token, run commands through the host-agent CLI, and print timings.
set -euo pipefail
bin_dir=${1:?usage: demo.sh BIN_DIR}
envd="$bin_dir/guest-envd"
agent="$bin_dir/host-agent"
work=$(mktemp -d)
trap 'kill "$envd_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

now_ms() { date +%s%3N; }

printf '{"TEMPLATE_VAR":"from-the-image","PATH":"/usr/local/bin:/usr/bin:/bin"}\n' >"$work/template-env.json"
t0=$(now_ms)
"$envd" --listen "unix:$work/envd.sock" --template-env "$work/template-env.json" 2>"$work/envd.log" &
envd_pid=$!
cli() { "$agent" envd --connect "unix:$work/envd.sock" "$@"; }
cli --wait-ms 5000 health
t1=$(now_ms)
cli init --env SANDBOX_ID=sbx-demo --env GREETING=hello --access-token demo-token
t2=$(now_ms)
export ENVD_TOKEN=demo-token
echo "--- a command sees all four env layers (per-command GREETING wins):"
cli exec --env GREETING=per-command -- sh -c 'echo "TEMPLATE_VAR=$TEMPLATE_VAR SANDBOX_ID=$SANDBOX_ID GREETING=$GREETING PATH=$PATH"'
t3=$(now_ms)
echo "--- without the token envd refuses:"
ENVD_TOKEN=wrong "$agent" envd --connect "unix:$work/envd.sock" exec -- true || echo "(refused, exit $?)"
echo "--- exit codes pass through:"
cli exec -- sh -c 'exit 7' || echo "(exit $?)"
echo "--- timings (ms): envd start to ready $((t1 - t0)), init $((t2 - t1)), first exec $((t3 - t2))"
