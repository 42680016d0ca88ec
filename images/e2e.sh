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
CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target "$T" -p guest-envd -p host-agent
cargo build --release -p envd-images
./target/release/envd-image template --envd "target/$T/release/guest-envd" \
  --oci-config images/testdata/oci-config.json --out target/template
exec ./target/release/envd-harness run --timeout "${ENVD_E2E_TIMEOUT:-900}" \
  --template target/template --host-agent "target/$T/release/host-agent" -- envd-e2e "$@"
