#!/usr/bin/env bash
# Run the whole test suite (sets up first, so it works on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
# pytest exits 5 when it collected no test: that is a failure here, as any non-zero exit is.
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
