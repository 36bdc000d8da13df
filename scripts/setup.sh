#!/usr/bin/env bash
# Create .venv and install the lab, pinned as in pyproject.toml.
#   bash scripts/setup.sh          the lab (what `lab materialize` needs)
#   bash scripts/setup.sh --test   also the test tools, and Debian's chromium (the UI test)
#                                  and postgresql (the team-instance test)
# torch is installed first, pinned, so pip takes the CPU build and never a CUDA one.
# Idempotent: re-running with an unchanged pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
extras=""
if [ "${1:-}" = "--test" ]; then
  extras="[test]"
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: needs Python 3.11 (got $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 1
fi
if [ -n "$extras" ] && { ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }; then
  # The browser test drives Debian's chromium through Playwright (never `playwright install`);
  # the team-instance test starts a real PostgreSQL server (scripts/local_postgres.sh).
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver \
    postgresql >/dev/null
fi
hash="$(sha256sum pyproject.toml | cut -c1-16)"
stamp=".venv/.installed$extras-$hash"
if [ -f "$stamp" ] || { [ -z "$extras" ] && [ -f ".venv/.installed[test]-$hash" ]; }; then
  exit 0  # up to date (a test install includes the plain one)
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".$extras"
rm -f .venv/.installed*
touch "$stamp"
echo "setup: .venv ready"
