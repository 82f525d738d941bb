"""Summarise a build log's ptxas resource report (built with CROSSLAYER_PTXAS_VERBOSE=1).

    python tools/ptxas_report.py build.log

One line per kernel instantiation and architecture: registers, spill bytes, stack.
"""

import re
import subprocess
import sys


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        return out.stdout.splitlines()
    except OSError:
        return names


def main(path: str) -> None:
    text = open(path, errors="replace").read()
    entries = re.findall(
        r"Compiling entry function '(\S+)' for '(sm_\d+)'\s+.*?(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\s+.*?Used (\d+) registers",
        text, re.S,
    )
    names = demangle([e[0] for e in entries])
    rows = sorted(
        (re.sub(r"crosslayer::|\(crosslayer::\w+\)", "", n), e[1], int(e[5]), int(e[3]), int(e[4]), int(e[2]))
        for n, e in zip(names, entries)
    )
    print(f"{'kernel':70s} {'arch':6s} {'regs':>4s} {'spillST':>7s} {'spillLD':>7s} {'stack':>5s}")
    for r in rows:
        print(f"{r[0][:70]:70s} {r[1]:6s} {r[2]:4d} {r[3]:7d} {r[4]:7d} {r[5]:5d}")
    spills = [r for r in rows if r[3] or r[4]]
    print(f"{len(rows)} instantiations, {len(spills)} with spills")


if __name__ == "__main__":
    main(sys.argv[1])
