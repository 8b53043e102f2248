#!/bin/sh
# Installs the Debian tools the system tests drive (swaks, promtool) when they are missing.
# Runs as part of `make test`; needs root and apt-get, as on CI and the developers' machines.
set -eu
missing=""
command -v swaks >/dev/null 2>&1 || missing="$missing swaks"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-tools: need root and apt-get to install:$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
