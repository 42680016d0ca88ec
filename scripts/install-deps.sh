#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine (idempotent, quiet when done).
set -euo pipefail

need=()
command -v cc >/dev/null || need+=(gcc)
command -v sha256sum >/dev/null || need+=(coreutils)
command -v stty >/dev/null || need+=(coreutils)
# The full-stack tests boot VMs with QEMU (the harness, and the reference VMM) and fetch Debian's kernel.
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v dpkg-deb >/dev/null || need+=(dpkg)
# The README's orchestrator example (run by the e2e) drives the API with curl.
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || { echo "install-deps: cargo is required (https://rustup.rs)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
exit 0
