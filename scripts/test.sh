#!/usr/bin/env bash
# The project's test command, on a fresh Debian/Ubuntu machine or a dev box:
#   1. as root, installs what the tests need when it is missing: the Docker
#      engine (docker.io), busybox-static (for the test image), prometheus
#      (for promtool) and systemd (for systemd-analyze);
#   2. starts dockerd when none answers, and imports the busybox test image;
#   3. runs cargo fmt --check, cargo clippy -D warnings, and cargo test;
#   4. with GPUWARDEN_FUZZ_SECONDS=N, fuzzes each target N seconds (scripts/fuzz.sh).
# Not root and something missing: it says what, and the tests that need it fail.
set -euo pipefail
cd "$(dirname "$0")/.."

TEST_IMAGE="${GPUWARDEN_TEST_IMAGE:-gpuwarden-test/busybox:latest}"
log() { printf '==> %s\n' "$*" >&2; }

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
# The image needs the static build: it runs alone in an empty rootfs.
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v promtool >/dev/null || missing+=(prometheus)
# systemd-analyze verify checks systemd/gpuwarden.service.
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "missing ${missing[*]}: run this as root once, or install them"
  fi
fi

docker_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
if command -v dockerd >/dev/null && ! docker_up; then
  if [ "$(id -u)" = 0 ]; then
    log "starting dockerd (log: /tmp/gpuwarden-test-dockerd.log)"
    # setsid: the engine outlives this script, as a system service would.
    setsid dockerd >/tmp/gpuwarden-test-dockerd.log 2>&1 < /dev/null &
    for _ in $(seq 1 60); do docker_up && break; sleep 0.5; done
    docker_up || { log "dockerd did not start:"; tail -20 /tmp/gpuwarden-test-dockerd.log >&2; exit 1; }
  else
    log "no Docker engine answers and this is not root: the Docker tests will fail"
  fi
fi

if docker_up; then
  scripts/busybox-image.sh "$TEST_IMAGE"
fi
export GPUWARDEN_TEST_IMAGE="$TEST_IMAGE"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test --workspace"
cargo test --workspace --locked

# Coverage-guided fuzzing is not part of the default run: cargo-fuzz and an
# instrumented build of the agent cost about half an hour on 2 cores (see
# fuzz/README.md); `cargo test` above replays the fuzz corpus and mutations
# of it instead. GPUWARDEN_FUZZ_SECONDS=N adds N seconds of each fuzz target.
if [ -n "${GPUWARDEN_FUZZ_SECONDS:-}" ]; then
  log "scripts/fuzz.sh $GPUWARDEN_FUZZ_SECONDS"
  scripts/fuzz.sh "$GPUWARDEN_FUZZ_SECONDS"
fi
