#!/usr/bin/env bash
# Alternated before/after runs of `qpq bench` (delivery on redb and PostgreSQL, fanout at 1000
# members), as BENCHMARKS.md's run of record since the twelfth session:
#   BEFORE=/path/qpq-old AFTER=/path/qpq-new LABELS="before1 after1 after2 before2 ..." \
#     scripts/bench-pairs.sh [OUT_DIR]
# Labels starting with "before" (or "b") use $BEFORE, the rest $AFTER. Each run gets a fresh
# database on one throwaway PostgreSQL 15 cluster (initdb as `nobody` when run as root, a free
# loopback port, fsync and synchronous_commit on). JSON reports go to OUT_DIR/LABEL.json; then
#   python3 scripts/bench-pairs-table.py OUT_DIR "before1 after1 ..."
set -euo pipefail
: "${BEFORE:?path of the before binary}" "${AFTER:?path of the after binary}" "${LABELS:?run labels}"
OUT=${1:-bench-out}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
mkdir -p "$OUT"
D=$(mktemp -d /tmp/qpq-bench-pg.XXXX)
chmod 755 "$D"
as_pg() { if [ "$(id -u)" = 0 ]; then su nobody -s /bin/sh -c "$1"; else sh -c "$1"; fi; }
[ "$(id -u)" = 0 ] && chown nobody "$D"
as_pg "$PGBIN/initdb -D $D/data -A trust -U qpq >/dev/null"
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
as_pg "$PGBIN/pg_ctl -D $D/data -o '-p $PORT -k $D -c listen_addresses=127.0.0.1' -l $D/log start -w >/dev/null"
trap 'as_pg "$PGBIN/pg_ctl -D $D/data stop -m fast >/dev/null"; rm -rf "$D"' EXIT
i=0
for L in $LABELS; do
  i=$((i + 1))
  case $L in before* | b*) BIN=$BEFORE ;; *) BIN=$AFTER ;; esac
  as_pg "$PGBIN/createdb -h 127.0.0.1 -p $PORT -U qpq run$i"
  H=$(mktemp -d)
  "$BIN" bench --scenario delivery,fanout --fanout-sizes 1000 --home "$H" \
    --postgres "postgres://qpq@127.0.0.1:$PORT/run$i" --json >"$OUT/$L.json" 2>"$OUT/$L.err"
  echo "$L done"
  rm -rf "$H"
done
