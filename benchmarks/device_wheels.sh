#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that the server tests need on the
# GPU box (Python 3.12, x86-64, no registry access there): the HTTP stack the box lacks
# and schemathesis for the schema test, with everything they depend on. They land in
# .whl/ (git-ignored, carried to the box with the working tree), with
# .whl/requirements.txt naming each pinned version. On the box:
#
#     python3 -m pip install --no-index --find-links .whl -r .whl/requirements.txt
#
# Versions come from main's constraints.txt (and the files it includes with -c) when
# main has one, else from `pip freeze` of the development venv (FREEZE_PYTHON). That
# venv must have every package installed: its metadata gives the dependency closure
# (markers evaluated for Python 3.12 on Linux, extras left out).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

DEST=${DEST:-.whl}
FREEZE_PYTHON=${FREEZE_PYTHON:-/work/main/.venv/bin/python}
PIP_PYTHON=${PIP_PYTHON:-$FREEZE_PYTHON}  # any Python with pip: it only downloads

# What the GPU box lacks or has too old (anyio>=4.10, typing-extensions>=4.16).
ROOTS=(fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection
       openai jiter distro httpx2 httpcore2 truststore opentelemetry-api annotated-doc
       anyio typing-extensions h11 sniffio schemathesis)

# A lock file of main with the files it includes (-c/-r lines), concatenated.
main_lock() {
    git show "main:$1" 2> /dev/null || return 1
    local inc
    for inc in $(git show "main:$1" | sed -n 's/^-[cr][[:space:]]*//p'); do
        main_lock "$inc"
    done
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if main_lock constraints.txt > "$TMP/pins.txt"; then
    echo "versions: main:constraints.txt"
else
    "$FREEZE_PYTHON" -m pip freeze --all > "$TMP/pins.txt"
    echo "versions: pip freeze of $FREEZE_PYTHON"
fi

# name==version for the roots and their dependency closure.
"$FREEZE_PYTHON" - "$TMP/pins.txt" "${ROOTS[@]}" > "$TMP/list.txt" << 'EOF'
import importlib.metadata as md
import sys

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

# The box: CPython 3.12 on x86-64 Linux. Requirements behind an extra are not wanted.
ENV = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
pins = {}
for line in open(sys.argv[1]):
    if "==" in line and not line.startswith("#"):
        name, version = line.split(";")[0].strip().split("==")
        pins[canonicalize_name(name)] = version.strip()
seen = {}


def walk(name):
    key = canonicalize_name(name)
    if key in seen:
        return
    seen[key] = pins.get(key)
    if seen[key] is None:
        sys.exit(f"no pinned version for {name}, which a package here needs: pin it")
    for text in md.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(ENV):
            walk(req.name)


for root in sys.argv[2:]:
    if canonicalize_name(root) in pins:
        walk(root)
    else:  # e.g. distro: older openai releases needed it, the pinned one does not
        print(f"skipped {root}: not pinned, and nothing pinned here needs it", file=sys.stderr)
for key in sorted(seen):
    print(f"{key}=={seen[key]}")
EOF
mapfile -t PINS < "$TMP/list.txt"

mkdir -p "$DEST"
for pin in "${PINS[@]}"; do
    "$PIP_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$DEST" "$pin"
done
printf '%s\n' "${PINS[@]}" > "$DEST/requirements.txt"
echo "${#PINS[@]} wheels in $DEST: $(du -sh "$DEST" | cut -f1)"
