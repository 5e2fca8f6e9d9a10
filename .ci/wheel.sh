#!/usr/bin/env bash
# The package as a user gets it: build the wheel and the sdist, install each into a fresh
# venv, then from an empty folder migrate a new SQLite database and start `serve`
# (no source tree in sight). About a minute per install (dependencies come from the index).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/broker-wheel.XXXXXX)
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

.venv/bin/python -m build --sdist --wheel --outdir "$work/dist" . >/dev/null

port=18989
for artifact in "$work"/dist/*.whl "$work"/dist/*.tar.gz; do
  port=$((port + 1))
  [ -e "$artifact" ] || continue
  echo "== $(basename "$artifact")"
  venv="$work/venv-$(basename "$artifact")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet "$artifact" 2>&1 | grep -v "^WARNING: Location" || true
  empty="$work/empty-$(basename "$artifact")"
  mkdir "$empty"
  cd "$empty"
  "$venv/bin/comfy-broker" --version
  # serve before migrating: one line saying what to run, exit 1
  if "$venv/bin/comfy-broker" serve 2>serve.err; then exit 1; fi
  grep -q "run \`comfy-broker db upgrade\`" serve.err
  "$venv/bin/comfy-broker" db upgrade >/dev/null 2>&1
  BROKER_PORT=$port "$venv/bin/comfy-broker" serve 2>serve.log &
  server=$!
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$port/healthz" || { cat serve.log; exit 1; }
  curl -sf "http://127.0.0.1:$port/docs/swagger-ui-bundle.js" >/dev/null  # offline docs
  echo
  kill "$server"; wait "$server" 2>/dev/null || true
  cd - >/dev/null
done
echo "wheel and sdist: installed, migrated and served from an empty folder"
