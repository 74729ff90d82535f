#!/usr/bin/env bash
# The test suite beside busy processes (issue 16): a test whose outcome depends on the
# machine being idle fails here. BUSY processes (default 3) spin for the whole run;
# ROUNDS runs (default 1) of `pytest -q "$@"` must all pass. `make test-loaded`.
set -u
cd "$(dirname "$0")/.."
busy=${BUSY:-3}
rounds=${ROUNDS:-1}
pids=()
for _ in $(seq "$busy"); do
  yes > /dev/null &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
rc=0
for r in $(seq "$rounds"); do
  echo "== round $r of $rounds beside $busy busy processes"
  .venv/bin/python -m pytest -q -p no:cacheprovider "$@" || rc=1
done
exit $rc
