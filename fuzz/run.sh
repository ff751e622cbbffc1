#!/usr/bin/env bash
# Runs the fuzz targets one after another, each for SECONDS (or until it has run RUNS inputs),
# starting from its seeds (fuzz/seeds/TARGET) and the corpus it grew before (fuzz/corpus/TARGET,
# not committed). A crash stops the run with the input under fuzz/artifacts/TARGET.
#
# usage: fuzz/run.sh SECONDS [RUNS] [TARGET...]   (all targets when none is named)
# needs: the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`)
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:?usage: fuzz/run.sh SECONDS [RUNS] [TARGET...]}
runs=${2:--1}
shift $(( $# >= 2 ? 2 : 1 ))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
echo "fuzz: building the targets (nightly, with AddressSanitizer)"
cargo +nightly fuzz build -O 2>&1 | grep -E '^(error|warning)' -A5 || true
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  log=$(mktemp)
  # The exposition parsers are line-oriented and an input of theirs costs about 0.2 ms per
  # kilobyte under AddressSanitizer: at 4 KiB (longer seeds are cut) they run 10× as many.
  max_len=65536
  [ "$target" = exposition ] && max_len=4096
  if ! cargo +nightly fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$seconds" -runs="$runs" -max_len="$max_len" -rss_limit_mb=4096 -timeout=10 \
      -print_final_stats=1 >"$log" 2>&1; then
    grep -v '^\s*\(#\|INFO\|NEW_FUNC\)' "$log" | tail -60
    echo "fuzz: $target FAILED (input in fuzz/artifacts/$target)"
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  echo "fuzz: $target ok: $execs inputs in ${seconds}s at most ($speed/s), corpus $(ls "corpus/$target" | wc -l) files"
  rm -f "$log"
done
