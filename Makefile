# envd-rs: `make demo` runs the main job, `make test` runs every test. Both install what they need.

CARGO ?= cargo
STATIC_TARGET := x86_64-unknown-linux-gnu
STATIC_DIR := target/$(STATIC_TARGET)/release
# Static, stripped binaries for images (the guest has no libc to link against). Not position-
# independent: a static-pie host-agent took ~55 ms to start in the nested test host (relocating
# itself), a non-PIE one ~10 ms, and the benches launch one per restore (README, Benchmarks).
STATIC_ENV := RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols

.PHONY: all deps build static test unit e2e lint demo bench fuzz clean

all: build

deps:
	@scripts/install-deps.sh

build:
	$(CARGO) build --workspace

static:
	$(STATIC_ENV) $(CARGO) build --release -p guest-envd -p host-agent --target $(STATIC_TARGET)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace

# Full-stack tests: the template image booted with a real kernel, driven over real vsock, inside the
# nested QEMU-TCG harness (natively on hosts with hardware KVM). Prints "VMM: N passed, M failed".
e2e: deps
	images/e2e.sh

test: deps lint unit e2e

demo: deps static
	@scripts/demo.sh

# The bench's guest probe runs inside the guests too, so it is static like envd.
bench: deps static
	$(STATIC_ENV) $(CARGO) build --release -p envd-benches --bin guest-probe --target $(STATIC_TARGET)
	@scripts/bench.sh

# Fuzz the frame and message decoders (cargo fuzz needs nightly features: RUSTC_BOOTSTRAP on stable).
FUZZ_SECONDS ?= 120
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run frame_decode -- -max_total_time=$(FUZZ_SECONDS)

clean:
	$(CARGO) clean
