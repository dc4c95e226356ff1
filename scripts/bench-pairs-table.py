#!/usr/bin/env python3
"""Rows and medians of scripts/bench-pairs.sh's reports: bench-pairs-table.py OUT_DIR "LABELS"."""
import json, statistics, sys

out, labels = sys.argv[1], sys.argv[2].split()
COLS = [
    ("redb 16", "delivered, 16 senders -> 8 recipients"),
    ("pg 1 node 16", "postgres 1 node: delivered, 16 senders -> 8 recipients"),
    ("pg 2 nodes 16", "postgres 2 nodes, cross-node: delivered, 16 senders -> 8 recipients"),
    ("pg 1 node 1", "postgres 1 node: delivered, 1 senders -> 8 recipients"),
    ("server cpu/msg", "server cpu per delivered msg, 16 senders -> 8 recipients"),
    ("fanout cpu/msg 1000", "cpu/msg, 1000 members"),
]
res = {}
for label in labels:
    rows = {}
    for scenario in json.load(open(f"{out}/{label}.json"))["scenarios"].values():
        for r in scenario:
            rows[r["case"]] = r["value"]
    vals = [rows[case] for _, case in COLS]
    p99 = lambda tail: next(v for c, v in rows.items() if c.startswith("wake-up p99") and tail(c))
    vals += [vals[2] / vals[0], p99(lambda c: "postgres" not in c),
             p99(lambda c: c.endswith("postgres 1 node")), p99(lambda c: c.endswith("cross-node"))]
    res[label] = vals
    print(f"| {label} | {vals[0]:.0f} | {vals[1]:.0f} | {vals[2]:.0f} | {vals[6]:.2f} | {vals[3]:.0f} | "
          f"{vals[4]:.1f} µs | {vals[5]:.2f} ms | {vals[7]:.1f} / {vals[8]:.1f} / {vals[9]:.1f} ms |")
names = [n for n, _ in COLS] + ["2 nodes / redb", "p99 redb", "p99 pg 1", "p99 pg 2"]
for group in ("before", "after"):
    mine = [l for l in labels if l.startswith(group)]
    if mine:
        print(group, {n: round(statistics.median(res[l][i] for l in mine), 2) for i, n in enumerate(names)})
