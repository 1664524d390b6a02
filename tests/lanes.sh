#!/usr/bin/env bash
# `make test`: the suite as two lanes of pytest processes running at once. Most of the suite is
# single-threaded (imports, tracing, compiling, subprocess start-up, tiny models' steps), so on
# 2 cores two lanes finish well before one. Each lane is two processes in turn: one process for
# everything exhausted the kernel's 65530 memory mappings per process with compiled executables
# (see the Makefile). Lane B's output is printed when it ends, after lane A's.
# Usage: tests/lanes.sh PYTHON [pytest args...]
set -u
py=$1
shift
engine="tests/runtime tests/cluster tests/proto"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
(
  "$py" -m pytest -q tests/serving "$@" && \
  "$py" -m pytest -q tests --ignore=tests/models --ignore=tests/serving --ignore=tests/runtime \
      --ignore=tests/cluster --ignore=tests/proto --ignore=tests/eval "$@"
) >"$log" 2>&1 &
lane_b=$!
"$py" -m pytest -q tests/models "$@" && "$py" -m pytest -q $engine "$@"
lane_a=$?
wait "$lane_b"
lane_b=$?
echo "---- lane B (tests/serving, then zoo, conversion, training, benches) ----"
cat "$log"
echo "---- lane A: exit $lane_a, lane B: exit $lane_b ----"
[ "$lane_a" -eq 0 ] && [ "$lane_b" -eq 0 ]
