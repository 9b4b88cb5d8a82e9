#!/usr/bin/env bash
# Set everything up, then run the whole test suite: ruff, mypy and pytest.
# Exits non-zero if any of the three fails, or if pytest collected no test at all.
# Extra arguments go to pytest (e.g. scripts/run-tests.sh tests/queue -x).
#
# Environment:
#   COFFER_TEST_TIMEOUT  per-test timeout in seconds (default 300; pytest-timeout)
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

"$repo/scripts/setup.sh" || exit 1

bin="$repo/.venv/bin"
failed=()

echo "== ruff check" >&2
"$bin/ruff" check . || failed+=(ruff)

echo "== mypy (strict; packages from pyproject.toml)" >&2
"$bin/mypy" || failed+=(mypy)

echo "== pytest" >&2
# pytest's own summary line ("N passed, M skipped in Xs") is the last line this prints on success.
"$bin/pytest" -q --timeout="${COFFER_TEST_TIMEOUT:-300}" "$@"
rc=$?
case $rc in
    0) ;;
    5) echo "run-tests: pytest collected no tests; that is a failure" >&2; failed+=(pytest) ;;
    *) failed+=(pytest) ;;
esac

if [ ${#failed[@]} -gt 0 ]; then
    echo "run-tests: FAILED: ${failed[*]}" >&2
    exit 1
fi
