#!/bin/sh
# Makes `python3 -m venv` work on a fresh Debian, where ensurepip lives in the separate
# python3-venv package. Called by the Makefile only when creating the venv failed.
set -eu
PYTHON=${1:-python3}
if "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-venv-support: $PYTHON cannot create virtual environments;" \
        "install the python3-venv package (apt-get install python3-venv)" >&2
    exit 1
fi
version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "python$version-venv" >/dev/null 2>&1 \
    || apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
