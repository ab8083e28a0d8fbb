#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite from the repository root, in parallel on every core.
# Arguments go to pytest, e.g. ./test.sh -x -k invariant. A run that collects no tests fails (pytest's
# exit code 5 would otherwise let an empty run look like a green one); every other exit code is pytest's own.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
bash scripts/setup-env.sh

# -n auto: one pytest-xdist worker per core; loadgroup keeps tests marked xdist_group on one worker, where
# they share a module fixture. -n 0 runs serially; -m "not slow" leaves out tests/slow (child processes,
# servers, a browser, the real SmolLM2); ./test.sh tests/unit runs the tests that need no model.
# One OpenBLAS thread per worker: the workers already take every core, and OpenBLAS's own threads on top of
# them turn its small calls slow (a 576 x 64 QR, as every RankReduce of st.effects does: 0.3 s instead of
# 3 ms on two busy cores). A caller's own setting is kept.
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
rc=0
.venv/bin/python -m pytest -n auto --dist loadgroup "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: no tests were collected (pytest exit code 5); failing, since an empty run is no pass" >&2
  exit 1
fi
exit "$rc"
