#!/usr/bin/env bash
# The package as users get it: build the sdist and, from it, the wheel (make dist); install the wheel with the tested
# versions (constraints.txt) into a clean venv outside the source tree, reusing pip's cache (torch is not downloaded
# again when `make install` fetched it); run .ci/smoke_wheel.py against it from an empty folder.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$SECONDS
make dist
built=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/inpformer-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m venv "$work/venv"  # the interpreter .venv was made with
"$work/venv/bin/python" -m pip install --quiet -c constraints.txt "$repo"/dist/*.whl
installed=$SECONDS
mkdir "$work/smoke"
cd "$work/smoke"
"$work/venv/bin/python" -I "$repo/.ci/smoke_wheel.py" "$repo" "$repo"/dist/*.whl "$repo"/dist/*.tar.gz
echo "wheel check: $((SECONDS - start)) s (build $((built - start)) s, clean install $((installed - built)) s," \
     "smoke test $((SECONDS - installed)) s)"
