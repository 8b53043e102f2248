#!/bin/sh
# Commit only the given paths, retrying while another process holds the git index lock.
# Usage: scripts/commit-paths.sh "message" path...
set -u
msg=$1; shift
i=0
while [ $i -lt 30 ]; do
    if git add -- "$@" 2>/dev/null && git commit -q -m "$msg" --only -- "$@"; then
        exit 0
    fi
    i=$((i + 1)); sleep 1
done
echo "commit-paths: gave up after 30 tries" >&2
exit 1
