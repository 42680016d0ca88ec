#!/bin/sh
# Runs inside the test host (or natively on a hardware-KVM host): boot the template in host-agent,
# take a template snapshot, record its working set, restore a sandbox from it with instance env, run
# commands, print timings.
set -eu
work=$(mktemp -d)
agent=host-agent
template=${TEMPLATE:-/template}
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
# Waits for `host-agent restore` (pid $2, stderr in $1) to print "sandbox ready"; fails if it exits.
wait_ready() {
  while ! grep -q "sandbox ready" "$1" 2>/dev/null; do
    if ! kill -0 "$2" 2>/dev/null; then cat "$1"; exit 1; fi
    sleep 0.1
  done
}

echo "== boot the template in host-agent (stock Debian kernel, guest-envd as PID 1)"
t0=$(ms)
$agent run --template "$template" --vsock-uds "$work/tpl.sock" --console-log "$work/tpl.log" \
  --api-sock "$work/tpl.api" 2>"$work/tpl.err" &
tpl=$!
$agent envd --connect "hvsock:$work/tpl.sock:49983" --wait-ms 180000 health
t1=$(ms)
echo "boot_to_envd_ready_ms: $((t1 - t0))"

echo "== template snapshot (before any instance /init)"
$agent ctl --api-sock "$work/tpl.api" snapshot --dir "$work/snap" --template --keep-paused
kill "$tpl" 2>/dev/null || true
wait "$tpl" 2>/dev/null || true

echo "== record the template's working set (one restore that runs /bin/true; later restores copy it in)"
$agent restore --snapshot "$work/snap" --vsock-uds "$work/rec.sock" --record-working-set \
  -- /bin/true 2>"$work/rec.err" &
rec=$!
wait_ready "$work/rec.err" "$rec"
grep "working set recorded" "$work/rec.err"
$agent envd --connect "hvsock:$work/rec.sock:49983" shutdown
wait "$rec"

echo "== restore a sandbox with instance env and a token, first command: echo"
ENVD_NEW_ACCESS_TOKEN=demo-token $agent restore --snapshot "$work/snap" --vsock-uds "$work/sbx.sock" \
  --console-log "$work/sbx.log" --env SANDBOX_ID=sbx-1 --env GREETING=hello \
  --timings-json "$work/timings.json" -- echo hello from the restored sandbox 2>"$work/sbx.err" &
sbx=$!
wait_ready "$work/sbx.err" "$sbx"
grep -v "restore_to_first_exec_ms" "$work/sbx.err"
export ENVD_TOKEN=demo-token
cli() { $agent envd --connect "hvsock:$work/sbx.sock:49983" "$@"; }
echo "== the env layers: template image env, instance env, per-command env"
cli exec --env GREETING=per-command -- sh -c 'echo "TEMPLATE_ONLY=$TEMPLATE_ONLY SANDBOX_ID=$SANDBOX_ID GREETING=$GREETING PWD=$PWD"'
echo "== guest clock vs host clock (seconds)"
echo "guest $(cli exec -- date +%s) host $(date +%s)"
echo "== a wrong token is refused"
ENVD_TOKEN=wrong cli exec -- true || true
cli shutdown
wait "$sbx"
grep "restore_to_first_exec_ms" "$work/sbx.err"
