"""Summarize a py-spy raw (collapsed-stack) profile: each function's share of the samples, inclusive and self.

`python scripts/pyspy_top.py PROFILE.txt [N]` prints the N (default 30) functions with the largest inclusive
share, idle waits included (a thread blocked in a wait is sampled there too).
"""

from __future__ import annotations

import sys
from collections import Counter


def main() -> None:
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [fr.split(" (")[0] for fr in stack.split(";")]
            for fr in set(frames):
                inclusive[fr] += n
            own[frames[-1]] += n
    print(f"{total} samples")
    for fr, n in inclusive.most_common(top):
        print(f"{100 * n / total:6.1f}% incl {100 * own[fr] / total:6.1f}% self  {fr}")


if __name__ == "__main__":
    main()
