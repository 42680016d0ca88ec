#!/usr/bin/env bash
# An example orchestrator driving host-agent's API with curl over its Unix socket: take a template
# snapshot of a freshly booted template (once), restore it as a sandbox with instance env and an
# access token, run a command with env, stream its output, and tear the sandbox down.
#
#   scripts/orchestrator-example.sh TEMPLATE_DIR [WORK_DIR]
#
# Needs host-agent on PATH (or $HOST_AGENT), curl, and a host with KVM that boots the template (see
# README: on PVM machines, run it inside the harness). jq is used when present.
set -euo pipefail

template=${1:?usage: $0 TEMPLATE_DIR [WORK_DIR]}
work=${2:-$(mktemp -d)}
host_agent=${HOST_AGENT:-host-agent}
snapshot=$work/template-snapshot

# api SOCKET METHOD PATH [BODY]: one call; the body is read from stdin so that secrets never show
# up in a process listing. Fails on an HTTP error and prints the JSON error.
api() {
    local sock=$1 method=$2 path=$3 body=${4:-}
    printf '%s' "$body" | curl --silent --show-error --fail-with-body --no-buffer \
        --unix-socket "$sock" -X "$method" -H 'content-type: application/json' \
        --data-binary @- "http://localhost$path"
}

start_agent() { # start_agent NAME: starts `host-agent serve`, waits for GET /health
    local sock=$work/$1.sock
    "$host_agent" serve --api-sock "$sock" --console-log "$work/$1.console.log" 2>"$work/$1.log" &
    for _ in $(seq 200); do
        curl -sf --unix-socket "$sock" http://localhost/health >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "host-agent did not come up; see $work/$1.log" >&2
    return 1
}

# 1. A template snapshot: boot, pause, snapshot (kind "template": refused once a sandbox got
#    instance env or a token), shut down.
if [[ ! -f $snapshot/state ]]; then
    start_agent template
    sock=$work/template.sock
    api "$sock" POST /boot "{\"template_dir\": \"$template\", \"mem_mib\": 256}"; echo
    api "$sock" POST /pause >/dev/null
    api "$sock" POST /snapshot "{\"dir\": \"$snapshot\", \"kind\": \"template\"}"; echo
    api "$sock" POST /shutdown >/dev/null
    wait
fi

# 2. A sandbox from it, with instance env and a token (the agent keeps the token; we never need it
#    again, so it does not have to be stored).
start_agent sandbox
sock=$work/sandbox.sock
token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
api "$sock" POST /restore "{\"snapshot_dir\": \"$snapshot\",
    \"env\": {\"GREETING\": \"hello\", \"API_KEY\": \"not-printed\"},
    \"access_token\": \"$token\", \"default_workdir\": \"/tmp\"}"; echo

# 3. Run a command with per-command env; output streams as NDJSON events as the process prints.
status=0
while IFS= read -r event; do
    if command -v jq >/dev/null; then
        case $(jq -r .type <<<"$event") in
            stdout) jq -j .data <<<"$event" ;;
            stderr) jq -j .data <<<"$event" >&2 ;;
            end) status=$(jq -r .status <<<"$event") ;;
        esac
    else
        echo "$event"
        [[ $event == *'"type":"end"'* ]] && status=$(sed -E 's/.*"status":(-?[0-9]+).*/\1/' <<<"$event")
    fi
done < <(api "$sock" POST /exec '{"cmd": "sh", "args": ["-c", "echo $GREETING $NAME from $(pwd)"], "env": {"NAME": "orchestrator"}}')
echo "command exited with $status"

# 4. What it cost, then tear down (the agent powers the guest off and exits).
api "$sock" GET /metrics | { command -v jq >/dev/null && jq -c .last_start || cat; }; echo
api "$sock" POST /shutdown; echo
wait
exit "$status"
