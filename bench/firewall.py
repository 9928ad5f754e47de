"""The cost of the edge's firewall rules: build time, memory and lookup time with a large
list (a country or blocklist feed of N CIDRs in a file), against an empty rule set.

    python -m bench.firewall [--entries 100000] [--lookups 200000]

Prints the figures; the edge runs one lookup per connection (at admission).
"""
from __future__ import annotations

import argparse
import ipaddress
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

from shared.firewall import Firewall


def feed(path: Path, n: int, rng: random.Random) -> None:
    lines = []
    for _ in range(n):
        prefix = rng.choice((16, 20, 22, 24, 24, 24, 28, 32))
        addr = ipaddress.IPv4Address(rng.randrange(1 << 32))
        lines.append(str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False)))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--lookups", type=int, default=200_000)
    args = p.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "feed.txt"
        feed(path, args.entries, rng)
        tracemalloc.start()
        t0 = time.perf_counter()
        wall = Firewall(["allow 192.0.2.0/24", f"deny file:{path}"])
        build = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    empty = Firewall(["allow 192.0.2.0/24"])
    addresses = [str(ipaddress.IPv4Address(rng.randrange(1 << 32))) for _ in range(args.lookups)]

    def per_lookup(fw: Firewall) -> float:
        t = time.perf_counter()
        for a in addresses:
            fw.decide(a)
        return (time.perf_counter() - t) / len(addresses)
    small, large = per_lookup(empty), per_lookup(wall)
    denied = sum(1 for a in addresses[:20_000] if (d := wall.decide(a)) is not None and not d.allowed)
    print(f"firewall: {args.entries} CIDRs from a file -> {wall.map.ranges} disjoint ranges; "
          f"build {build:.2f} s, peak memory while building {peak / 1e6:.0f} MB")
    print(f"lookup: {small * 1e6:.2f} us with 1 rule, {large * 1e6:.2f} us with {args.entries} "
          f"({denied / 200:.1f} % of random addresses denied)")


if __name__ == "__main__":
    main()
