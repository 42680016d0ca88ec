#!/bin/sh
# Runs inside the test host (see images/e2e.sh): every full-stack runner in turn, each printing its own
# `NAME: N passed, M failed` line; exits non-zero if any of them failed.
#   envd-e2e              per-VMM checks (qemu, host-agent), host-agent's bad input, boot comparison
#   envd-snapshot-e2e     snapshot/restore: clones, pause/resume, bad snapshots, timings
#   api-flow              the orchestrator API against real VMs
#   orchestrator-example  scripts/orchestrator-example.sh (bash + curl over the API socket)
failed=""
envd-e2e "$@" || failed="$failed envd-e2e"
envd-snapshot-e2e || failed="$failed envd-snapshot-e2e"
api-flow || failed="$failed api-flow"

# The README's example orchestrator: restore a sandbox, run a command with env, tear it down. Its
# output goes to a file (a command substitution would also wait for the agents it starts).
work=$(mktemp -d)
if timeout 600 orchestrator-example.sh /template "$work" >"$work/stdout" 2>"$work/stderr"; then
  cat "$work/stdout"
  if grep -q '"data":"hello orchestrator from /tmp\\n"\|^hello orchestrator from /tmp$' "$work/stdout" &&
    grep -q '^command exited with 0$' "$work/stdout"; then
    echo "orchestrator-example: 1 passed, 0 failed"
  else
    echo "orchestrator-example: 0 passed, 1 failed (expected the command's output and exit 0)"
    failed="$failed orchestrator-example"
  fi
else
  st=$?
  cat "$work/stdout" "$work/stderr"
  echo "orchestrator-example: 0 passed, 1 failed (exit status $st)"
  failed="$failed orchestrator-example"
fi

if [ -n "$failed" ]; then
  echo "e2e: failed:$failed"
  exit 1
fi
echo "e2e: every runner passed"
