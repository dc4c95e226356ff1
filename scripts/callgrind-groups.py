#!/usr/bin/env python3
# Self instruction counts (Ir) of a callgrind output file, summed per primitive, for the MLS
# commit attribution in BENCHMARKS.md ("Issue 11: where a hybrid commit's instructions go").
# Usage: scripts/callgrind-groups.py callgrind.out.2 [...]   (the part dumped for self_update;
# see the callgrind_commit_workload test in src/mls/crypto.rs for the valgrind command)
import collections
import re
import sys

GROUPS = [
    ("x25519", r"libcrux_hacl_rs::(bignum|curve)25519|curve25519_dalek|montgomery|x25519"),
    ("ml-kem", r"libcrux_ml_kem|ml_kem|module_lattice|hybrid_array"),
    ("sha3/shake", r"libcrux_sha3|keccak"),
    ("sha-256 (hkdf, tree and transcript hashes)", r"sha256|libcrux_sha2"),
    ("sha-512 (ed25519)", r"sha512"),
    ("aes-128-gcm", r"aes|ghash|polyval"),
    ("copies, allocation, serialization", r"memcpy|memmove|malloc|free|realloc|_int_|tls_codec|serde|alloc::"),
]


def self_costs(path):
    """Self cost per function name; `calls=` lines are followed by an inclusive cost, skipped."""
    names, cost, fn, skip = {}, collections.Counter(), None, False
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?", line)
        if m:
            if m.group(3) is not None:
                names[m.group(2)] = m.group(3)
            if m.group(1) == "fn":
                fn = names.get(m.group(2))
            continue
        if line.startswith("calls="):
            skip = True
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
                continue
            parts = line.split()
            if len(parts) >= 2 and fn is not None:
                cost[fn] += int(parts[1])
    return cost


for path in sys.argv[1:]:
    cost = self_costs(path)
    total = sum(cost.values())
    groups = collections.Counter()
    for name, v in cost.items():
        group = next((g for g, pat in GROUPS if re.search(pat, name)), "other")
        groups[group] += v
    print(f"{path}: {total / 1e6:.1f} M Ir")
    for g, v in groups.most_common():
        print(f"  {g:45s} {v / 1e6:8.1f} M  {100 * v / total:5.1f}%")
