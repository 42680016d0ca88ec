#!/usr/bin/env bash
# The demo: build the template image, then (inside the nested test host, or natively on a host with
# hardware KVM) boot it in host-agent, snapshot it, restore a sandbox with instance env, run commands
# and print timings. Timings under emulation are only meaningful as ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
T=x86_64-unknown-linux-gnu
cargo build --release -p envd-images
./target/release/envd-image template --envd "target/$T/release/guest-envd" \
  --oci-config images/testdata/oci-config.json --out target/template
log=$(mktemp)
trap 'rm -f "$log"' EXIT
./target/release/envd-harness run --timeout "${ENVD_DEMO_TIMEOUT:-900}" \
  --template target/template --host-agent "target/$T/release/host-agent" \
  --include scripts/demo-vm.sh:/usr/local/bin/demo-vm.sh -- demo-vm.sh 2>&1 | tee "$log"
# The headline, last: restore of the template to the first command's output back on the host.
grep -m1 '^restore_to_first_exec_ms:' "$log" || { echo "demo: no restore timing" >&2; exit 1; }
