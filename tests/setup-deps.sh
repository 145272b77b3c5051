#!/bin/sh
# System packages and npm modules the tests use, installed once.
set -e
cd "$(dirname "$0")/.."
missing=""
for tool in pidof; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  echo "tests need:$missing" >&2
  exit 1
fi
