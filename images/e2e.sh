#!/bin/sh
# Glue: build what the full-stack e2e needs, build the template, and run envd-e2e inside the nested test
# host (or natively on a host with hardware KVM). Extra arguments go to envd-e2e.
# Needs: apt-get (Debian packages: the cloud kernel, busybox-static) and qemu-system-x86 installed.
set -eu
cd "$(dirname "$0")/.."
T=x86_64-unknown-linux-gnu
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "e2e.sh: qemu-system-x86_64 missing; run: apt-get install -y qemu-system-x86" >&2
  exit 125
fi
# Static, stripped builds (same flags as `make static`, so the artifacts are shared).
static_build() {
  CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
    cargo build --release --target "$T" "$@"
}
static_build -p guest-envd -p host-agent
# The API flow against real VMs (host-agent/examples/api_flow.rs).
static_build -p host-agent --example api_flow
# The guest-side vsock test tool, baked into the test template (own invocation: its own feature set).
static_build -p envd-images --bin envd-vsock-connect
cargo build --release -p envd-images
./target/release/envd-image template --envd "target/$T/release/guest-envd" \
  --oci-config images/testdata/oci-config.json \
  --add "target/$T/release/envd-vsock-connect:/usr/local/bin/envd-vsock-connect" --out target/template
# The runners in one test host (see images/e2e-inner.sh): per-VMM checks, snapshot/restore, the API
# flow and the README's orchestrator example (bash and curl from this machine, with their libraries).
# A test host that goes silent (an emulator fault, see README "test harness") is rerun up to twice.
exec ./target/release/envd-harness run --timeout "${ENVD_E2E_TIMEOUT:-1800}" --stall-retries 2 \
  --template target/template --host-agent "target/$T/release/host-agent" \
  --include target/release/envd-snapshot-e2e:/usr/local/bin/envd-snapshot-e2e \
  --include "target/$T/release/examples/api_flow:/usr/local/bin/api-flow" \
  --include scripts/orchestrator-example.sh:/usr/local/bin/orchestrator-example.sh \
  --include "$(command -v bash):/bin/bash" --include "$(command -v curl):/usr/bin/curl" \
  --include images/e2e-inner.sh:/usr/local/bin/e2e-inner.sh \
  -- e2e-inner.sh "$@"
