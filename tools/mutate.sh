#!/usr/bin/env bash
# Break the code on purpose, run the tests that should notice, put the code back (docs/testing.md).
# usage: tools/mutate.sh FILE OLD NEW PYTEST-ARGS...
#   replaces the first OLD in FILE by NEW, runs pytest with PYTEST-ARGS, restores FILE;
#   prints KILLED (a test failed: the mutation was caught) or SURVIVED (no test noticed).
set -uo pipefail
cd "$(dirname "$0")/.."
file=$1 old=$2 new=$3
shift 3
backup=$(mktemp) log=$(mktemp)
cp "$file" "$backup"
trap 'cp "$backup" "$file"; rm -f "$backup"' EXIT
.venv/bin/python - "$file" "$old" "$new" <<'PY' || { echo "mutation target not found in $file" >&2; exit 2; }
import sys
path, old, new = sys.argv[1:4]
text = open(path).read()
if old not in text:
    sys.exit(1)
open(path, "w").write(text.replace(old, new, 1))
PY
if .venv/bin/python -m pytest -q -x -p no:cacheprovider "$@" >"$log" 2>&1; then verdict=SURVIVED; else verdict=KILLED; fi
echo "$verdict: $file: ${old:0:60} -> ${new:0:60} ($(grep -m1 -o 'FAILED [^ ]*' "$log"))"
rm -f "$log"
