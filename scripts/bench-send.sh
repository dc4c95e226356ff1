#!/usr/bin/env bash
# Wall time of a one-shot `qpq send` (no passphrase) on loopback, next to `qpq whoami` (no
# network) and `qpq health` (connect + one call), so the network share is visible.
# Usage: scripts/bench-send.sh [path/to/qpq]   (default target/release/qpq; hyperfine if present)
set -euo pipefail
QPQ=$(realpath "${1:-target/release/qpq}")
RUNS=40
DIR=$(mktemp -d /tmp/qpq-bench-send-XXXXXX)
"$QPQ" serve --listen 127.0.0.1:0 --data-dir "$DIR/server" >"$DIR/serve.out" 2>/dev/null &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do grep -q "listening on" "$DIR/serve.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(awk '/listening on/ {print $3}' "$DIR/serve.out")
BOB=$("$QPQ" --home "$DIR/bob" --server "$ADDR" init --no-passphrase 2>/dev/null)
"$QPQ" --home "$DIR/alice" --server "$ADDR" init --no-passphrase >/dev/null 2>&1
# The first send creates the conversation (KeyPackage, Welcome); time the steady state after it.
"$QPQ" --home "$DIR/alice" send "$BOB" "first" >/dev/null
SEND="$QPQ --home $DIR/alice send $BOB hello"
if command -v hyperfine >/dev/null; then
    hyperfine -N --warmup 3 --runs "$RUNS" "$SEND" "$QPQ --home $DIR/alice whoami" "$QPQ --home $DIR/alice health"
else
    start=$(date +%s%N)
    for _ in $(seq "$RUNS"); do $SEND >/dev/null; done
    echo "qpq send: $(( ($(date +%s%N) - start) / RUNS / 1000000 )) ms mean over $RUNS runs"
fi
