#!/usr/bin/env bash
# A tour of gpuwarden for a newcomer, after the README's set-up (Docker
# running, busybox-static installed: scripts/test.sh does both as root):
# starts the daemon on the simulated DGX A100 with the example policy,
# launches sessions until a plan's pool refuses, shows the inventory, the
# usage and a metrics excerpt, and stops everything it started.
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m### %s\033[0m\n' "$*"; }
run() { printf '$ gpuwarden %s\n' "$*"; "$BIN" "$@"; }

# GPUWARDEN_BIN: a binary already built (skips the release build).
BIN=${GPUWARDEN_BIN:-target/release/gpuwarden}
SOCKET=target/sim/gpuwarden.sock
IMAGE=gpuwarden-test/busybox:latest

if [ -z "${GPUWARDEN_BIN:-}" ]; then
  say "building the release binary"
  cargo build --release --locked --quiet
fi
scripts/busybox-image.sh "$IMAGE"

# A fresh state each time, so the figures below are this run's.
rm -rf target/sim
mkdir -p target/sim
say "starting the daemon on the simulated DGX A100 (log: target/sim/gpuwarden.log)"
"$BIN" run --config config/simulated.toml >target/sim/gpuwarden.log 2>&1 &
DAEMON=$!
sessions=()
cleanup() {
  for id in "${sessions[@]}"; do
    "$BIN" ctl --socket "$SOCKET" stop "$id" --timeout 1 >/dev/null 2>&1 || true
  done
  kill -TERM "$DAEMON" 2>/dev/null || true
  wait "$DAEMON" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  "$BIN" ctl --socket "$SOCKET" inventory >/dev/null 2>&1 && break
  sleep 0.1
done

ctl() { run ctl --socket "$SOCKET" "$@"; }
launch() {
  local id
  printf '$ gpuwarden ctl launch %s\n' "$*"
  if id=$("$BIN" ctl --socket "$SOCKET" launch -q "$@" 2>&1); then
    sessions+=("$id")
    echo "started $id"
  else
    echo "$id"
  fi
}

say "what the host has"
ctl inventory | head -12

say "u-bob (free plan: 1 session) launches twice: the second is refused"
launch --as u-bob --mig 1g.10gb "$IMAGE" sleep 600
launch --as u-bob --mig 1g.10gb "$IMAGE" sleep 600

say "acme-vision (a sub-account of acme, max 2 sessions): the third is refused"
launch --as u-bob --org acme-vision --mig 1g.10gb "$IMAGE" sleep 600
launch --as u-bob --org acme-vision --mig 3g.40gb "$IMAGE" sleep 600
launch --as u-bob --org acme-vision --gpus 1 "$IMAGE" sleep 600

say "u-carol has no credit left, and GPU 7 is acme's in its reservation window"
launch --as u-carol --gpus 1 "$IMAGE" sleep 600
launch --as u-alice --device GPU-6a5da790-0728-45bf-9407-3e280f594b6d "$IMAGE" sleep 600

say "the sessions"
ctl sessions

say "after a few seconds, stop them: their usage is cut at Docker's finish"
sleep 3
for id in "${sessions[@]}"; do
  "$BIN" ctl --socket "$SOCKET" stop "$id" --timeout 1 >/dev/null
done
sessions=()
ctl usage acme
ctl usage u-bob

say "a metrics excerpt (GET /metrics on 127.0.0.1:9477)"
exec 3<>/dev/tcp/127.0.0.1/9477
printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
grep -E '^gpuwarden_(devices|launches_total|gpu_seconds_total|cost_credits_total)\{' <&3 | head -14
exec 3<&-

say "the audit trail"
ctl audit --limit 8

say "stopping the daemon (containers would be left running; none are)"
