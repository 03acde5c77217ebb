#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of what gpuwarden reads
# from outside: launch requests (as protobuf bytes, and field by field), the
# policy file, the config file and the host fixture. See fuzz/README.md.
#
#   scripts/fuzz.sh [SECONDS]              every target for SECONDS each (default 60)
#   scripts/fuzz.sh --replay TARGET FILE   run one input through TARGET (a crash to debug)
#   scripts/fuzz.sh --minimize [SECONDS]   fuzz, then shrink each working corpus (cmin)
#
# Environment:
#   FUZZ_TARGETS="policy config"   only these targets (default: all five)
#   FUZZ_SANITIZER=address         build with ASan (default none: gpuwarden forbids
#                                  unsafe code, so ASan mostly costs speed)
#   FUZZ_JOBS=2                    libFuzzer processes per target (default 1; with
#                                  more, libFuzzer writes their logs to fuzz-N.log
#                                  and the summary has no figures)
#
# Runs on the stable toolchain: cargo-fuzz passes flags that only nightly
# accepts, so the script sets RUSTC_BOOTSTRAP=1 for its builds. Installs
# cargo-fuzz from crates.io when missing (2-3 minutes on 2 cores); needs a
# C++ compiler for libFuzzer (g++ or clang++). The first build takes several
# minutes (the whole agent, instrumented, in fuzz/target).
#
# The working corpus is fuzz/corpus/TARGET (not committed), seeded from the
# committed fuzz/seeds/TARGET. A crash stops that target, is saved under
# fuzz/artifacts/TARGET/, and makes the script exit 1 naming it; once fixed,
# copy the input to fuzz/regressions/TARGET/ so that `cargo test --test
# hostile_input` replays it on every run.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS="launch_proto launch_fields policy config fixture"
targets="${FUZZ_TARGETS:-$ALL_TARGETS}"
sanitizer="${FUZZ_SANITIZER:-none}"
jobs="${FUZZ_JOBS:-1}"
log() { printf '==> %s\n' "$*" >&2; }

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked
fi
build_flags=(-s "$sanitizer" -O --debug-assertions)
job_flags=()
if [ "$jobs" -gt 1 ]; then
  job_flags=(-jobs="$jobs" -workers="$jobs")
fi

dict_of() {
  case "$1" in
    policy | config | fixture) printf -- '-dict=fuzz/dicts/%s.dict' "$1" ;;
  esac
}

if [ "${1:-}" = --replay ]; then
  [ $# -eq 3 ] || { echo "usage: $0 --replay TARGET FILE" >&2; exit 2; }
  cargo fuzz run "${build_flags[@]}" "$2" "$3"
  exit
fi

minimize=false
if [ "${1:-}" = --minimize ]; then
  minimize=true
  shift
fi
seconds="${1:-60}"
case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [--minimize] [SECONDS] | --replay TARGET FILE" >&2; exit 2 ;;
esac

log "building the fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build "${build_flags[@]}"

failed=()
summary=()
for target in $targets; do
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus" "fuzz/seeds/$target" "fuzz/artifacts/$target"
  log "fuzzing $target for ${seconds}s"
  out="fuzz/artifacts/$target/last-run.log"
  set +e
  # shellcheck disable=SC2046 # the dictionary flag is one word or none
  cargo fuzz run "${build_flags[@]}" "$target" "$corpus" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    ${job_flags[@]+"${job_flags[@]}"} $(dict_of "$target") 2>&1 | tee "$out" | grep -E '^(#[0-9]+.*(pulse|DONE)|==[0-9]+==|thread .* panicked|SUMMARY|stat::)' >&2
  status=${PIPESTATUS[0]}
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -1)
  if $minimize && [ "$status" -eq 0 ]; then
    log "minimizing $corpus"
    cargo fuzz cmin "${build_flags[@]}" "$target" "$corpus" >/dev/null 2>&1
  fi
  units=$(find "$corpus" -type f | wc -l)
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$out" | tail -1)
    summary+=("$(printf '%-14s FAILED  %s' "$target" "${crash:-see $out}")")
  else
    summary+=("$(printf '%-14s ok      %10s runs  %6s exec/s  %5s corpus' "$target" "${runs:-?}" "${speed:-?}" "$units")")
  fi
done

printf '\n%s\n' "fuzzed ${seconds}s per target:" >&2
printf '  %s\n' "${summary[@]}" >&2
if [ ${#failed[@]} -gt 0 ]; then
  log "crashes in: ${failed[*]} (inputs under fuzz/artifacts/; replay with $0 --replay TARGET FILE)"
  exit 1
fi
