#!/usr/bin/env bash
# `make bench`: guest-envd's own benchmarks on this host, then the VM benchmarks (host-agent beside
# QEMU, same kernel and initrd) inside the nested test host, or natively on a hardware-KVM host.
set -euo pipefail
cd "$(dirname "$0")/.."
T=x86_64-unknown-linux-gnu

cargo build --release -p guest-envd
cargo bench -p envd-benches --bench envd
cargo run -q --release -p envd-benches --bin bench-report

# The VM benches run where KVM and vhost-vsock are real.
cargo build --release -p envd-images -p envd-benches
./target/release/envd-image template --envd "target/$T/release/guest-envd" \
  --oci-config images/testdata/oci-config.json --out target/bench-template
# The vm bench's own artifact (cargo also reports the package's binaries, in no fixed order).
vm_bench=$(cargo bench -p envd-benches --bench vm --no-run --message-format=json 2>/dev/null \
  | grep '"kind":\["bench"\]' | grep '"name":"vm"' | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
[ -x "$vm_bench" ] || { echo "bench: cannot find the vm bench binary" >&2; exit 1; }
# criterion prints nothing while it collects a group's samples (up to minutes for the boot groups).
./target/release/envd-harness run --timeout "${ENVD_BENCH_TIMEOUT:-3000}" --stall-secs 600 \
  --template target/bench-template \
  --host-agent "target/$T/release/host-agent" \
  --include "$vm_bench:/usr/local/bin/vm-bench" \
  --include target/release/bench-report:/usr/local/bin/bench-report \
  --include "target/$T/release/guest-probe:/usr/local/bin/guest-probe" \
  -- sh -c 'ENVD_VM_BENCH=1 CRITERION_HOME=/tmp/criterion vm-bench --bench >&2; s=$?; bench-report /tmp/criterion; exit $s'
