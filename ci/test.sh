#!/usr/bin/env bash
# The whole test suite, as README.md tells users to run it and as CI runs it (.ci/run):
# installs the system packages, builds the guest image, checks formatting and lints, then runs
# every test: unit, engine (real io_uring), libblkio client, and the QEMU guest tests. The RBD
# tests (crates/uringblk/tests/rbd*.rs) start their own single-node Ceph cluster with
# scripts/ceph-cluster.sh (one per test binary, stopped when it exits).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

start=$(date +%s)
step() { echo; echo "=== $* ($(( $(date +%s) - start )) s)"; }

step "system packages"
bash scripts/install-deps.sh

step "guest image"
bash scripts/build-guest.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
# Everything the VM and client tests need was installed above: a missing piece is a failure,
# never a skip.
export CI=true
mkdir -p build
cargo test --workspace --all-targets 2>&1 | tee build/test.log
step "done"
