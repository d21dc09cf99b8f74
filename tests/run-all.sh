#!/usr/bin/env bash
# The whole vublk test suite, on a fresh Debian 12 machine, as root.
#
# Installs the Debian packages the tests need when missing (QEMU from
# bookworm-backports, a guest kernel, busybox, fio, e2fsprogs), then runs
# formatting and lint checks, every unit and integration test (real unix
# sockets, io_uring, libblkio frontends, zram, QEMU guests under TCG) and a
# short run of the benchmark so that it keeps working.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }
start=$(date +%s)

if [[ $(id -u) -eq 0 ]]; then
    step "Debian packages"
    tests/guest/deps.sh
else
    echo "not root: skipping package installation; guest, zram and loop-device tests will skip"
fi

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

step "cargo test (unit, integration, real guests)"
# The guest tests serialise themselves; the rest run two at a time.
VUBLK_E2E_SKIP_DEPS=1 cargo test --locked -- --test-threads=2

step "benchmark smoke run"
cargo bench --locked --bench iops -- --quick

printf '\nall checks passed in %d s\n' $(( $(date +%s) - start ))
