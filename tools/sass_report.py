"""Occupancy and memory-level parallelism of the compiled kernels, read from their SASS.

    python tools/sass_report.py [--so PATH] [--arch sm_90] [--kernel REGEX]
                                [--launch NAME_REGEX=THREADS[,SMEM_BYTES]]... [--csv PATH] [-v]

One row per kernel instantiation in PATH (the built crosslayer/_C*.so by default, or any
fatbinary or .cubin that cuobjdump reads) for one architecture:

- registers per thread and static shared memory: `cuobjdump -res-usage`. On sm_90 its
  SHARED figure includes the 1 KB the driver reserves per block (the ELF maps it at offset
  0, user data follows); where the cubin declares that mapping (.nv.reservedSmem) it is
  subtracted, so "static smem" is what the source declares, as `ptxas -v` prints it;
- launch bounds: the .nv.info.<kernel> attributes of `cuobjdump -elf`. EIATTR_MAX_THREADS
  holds __launch_bounds__' max threads; the min-blocks argument is not stored (CUDA 13
  ptxas emits no min-CTA attribute): what remains of it is the register cap ptxas derived,
  EIATTR_MAXREG_COUNT, shown when below 255;
- blocks per SM from registers, shared memory, warps and the per-SM block limit, as
  cuda_occupancy.h computes them (registers allocated per warp in units of 256 within
  each of the 4 sub-partitions, shared memory per block = static + dynamic + 1 KB reserved
  in units of 128 B, the largest shared-memory carveout); barriers are not modelled.
  Threads per block and dynamic shared memory are launch-time values: give them with
  --launch (or `launches`); otherwise the launch bounds' max threads and no dynamic shared
  memory are assumed (marked *), or, without launch bounds, occupancy is n/a;
- memory-level parallelism, per loop. Loops are the natural loops of the SASS control-flow
  graph: a branch back to a block that dominates it (in practice a backward BRA) closes a
  loop whose body is every block that reaches the branch without passing the header; loops
  sharing a header merge, nested loops are reported each, an outer one including its inner
  ones. (`@P CALL.REL.NOINC` to just past a back branch is how ptxas leaves some loops: a
  call counts as a branch that may also fall through.) From the header, along every path
  through the body (back edges dropped, so a nested loop runs once), the global loads
  (LDG*, and generic LD*, counted as global) issued before the first instruction that
  reads a register one of them wrote are the loads in flight at once per thread; the path
  with the most bytes is reported (ties: the fewest loads, i.e. the vectorised fast path
  over its scalar tail). Widths: .128 = 16 B, .64 = 8 B, .U16/.S16
  = 2 B, .U8/.S8 = 1 B, else 4 B; bytes per SM = bytes per thread x threads per block x
  blocks per SM. The "main loop" is the loop issuing the most global loads itself (not
  counting those of loops nested in it); -v lists every loop. `ld16-min` is the fewest
  loads ahead of first use in any loop, nested in another, whose own global loads are
  all 16 bytes wide: a floor on the loads in flight of every vectorised fast path that
  runs per token or chunk (a checked tail, which mixes in narrower loads, and a
  once-per-block loop outside every other, such as a final flush, do not count). LDGSTS (async copies to shared
  memory, no register result) are counted apart; shared and constant loads are ignored.
  Global loads outside every loop are counted too.

Limits: this is static analysis of the instruction stream, not the hardware scoreboard,
and says nothing of which path runs or how often. A load's destination is its first
operand (.128 writes 4 registers, .64 two); a use is a later instruction naming one as a
source; a write without a read ends tracking of that register, unless predicated. A
predicated load counts as issued, except on the side of a branch on the same predicate
where it cannot have run. Loads issued at the end of one iteration for the next (software
pipelining) count as ahead of first use; unrolled loops are straight-line code and count
as such. A multi-register source operand covers the registers its opcode implies for
loads, stores, .64 operands, IMAD.WIDE, FP64 arithmetic and HMMA; any other counts as the
one register it names. At most 256 distinct path states are kept per block.
"""

import argparse
import csv
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Per-SM limits (cuda_occupancy.h and the CUDA programming guide's table of compute
# capabilities): threads, resident blocks, shared memory with the largest carveout, and
# shared memory one block may opt in to.
ARCHS = {
    "sm_80": dict(threads=2048, blocks=32, smem=167936, smem_block=166912),
    "sm_86": dict(threads=1536, blocks=16, smem=102400, smem_block=101376),
    "sm_89": dict(threads=1536, blocks=24, smem=102400, smem_block=101376),
    "sm_90": dict(threads=2048, blocks=32, smem=233472, smem_block=232448),
}
REGS_PER_SM = 65536
REGS_PER_BLOCK = 65536
MAX_REGS_PER_THREAD = 255
REG_UNIT = 256          # registers allocated per warp in multiples of this
SUB_PARTITIONS = 4      # the register file is split between 4 schedulers
SMEM_UNIT = 128
SMEM_RESERVED = 1024    # per block, taken by the driver
WARP = 32

GLOBAL_LOADS = {"LDG", "LD"}
ASYNC_COPIES = {"LDGSTS"}
LOADS = GLOBAL_LOADS | {"LDS", "LDC", "LDL"}
STORES = {"ST", "STG", "STS", "STL", "RED", "REDG", "ATOM", "ATOMG", "ATOMS"}
FP64 = {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX"}
BLOCK_ENDS = {"BRA", "CALL", "BRX", "JMX", "JMP", "EXIT", "RET"}
JUMPS = {"BRA", "CALL"}  # with a target address operand
NO_DEST = {"WARPSYNC", "BRX", "JMX", "JMP", "RET", "CALL"}   # first register operand is read
PRED_THEN_DEST = {"SHFL", "LOP3", "ATOM", "ATOMG"}           # `OP Pd, Rd, ...`
HMMA_AB = {"16816": (4, 2), "1688": (2, 1)}                  # registers of the A and B fragments
WIDTH_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}

INSTR = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*);")
REG = re.compile(r"(?<![\w.])R(\d+)(\.64)?")
PLAIN_REG = re.compile(r"R(\d+|Z)")
PRED = re.compile(r"!?(U?P(?:\d+|T))")


@dataclass
class Instr:
    addr: int
    opcode: str
    pred: str | None  # guard predicate without the @, e.g. "!P0"; None when unconditional
    srcs: frozenset   # registers read
    dests: frozenset  # registers written
    target: int | None = None  # branch target, for BRA
    ends_block: bool = False   # a branch, exit or return
    falls_through: bool = True  # False after an unconditional branch, exit or return
    pred_writes: frozenset = frozenset()  # predicate registers it may write, e.g. {"P0"}


def find_cuobjdump() -> str:
    """cuobjdump from $CUOBJDUMP, PATH, /usr/local/cuda/bin or triton's bundled copy."""
    if os.environ.get("CUOBJDUMP"):
        if not os.access(os.environ["CUOBJDUMP"], os.X_OK):
            raise FileNotFoundError(f"CUOBJDUMP={os.environ['CUOBJDUMP']} is not an executable")
        return os.environ["CUOBJDUMP"]
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        candidates.append(os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump"))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(
        "cuobjdump not found; looked at $CUOBJDUMP, PATH, /usr/local/cuda/bin and triton's "
        "backends/nvidia/bin. `pip install nvidia-cuda-cuobjdump` or triton provides it "
        "(then set CUOBJDUMP to its path if it is not on PATH).")


def default_so() -> str:
    """The built extension next to the crosslayer package (installed or in this checkout)."""
    spec = importlib.util.find_spec("crosslayer")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    roots.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "crosslayer"))
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "_C*.so")))
        if found:
            return found[0]
    raise FileNotFoundError(f"no built crosslayer/_C*.so under {roots}; build the extension or pass --so")


def run(cmd: list[str], cwd: str | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if out.returncode:
        cmd_text = " ".join([os.path.basename(cmd[0])] + cmd[1:])
        raise RuntimeError(f"{cmd_text} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        return out.stdout.splitlines() if out.returncode == 0 else names
    except OSError:
        return names


def short_name(demangled: str) -> str:
    """`void ns::k<T, 1>(ns::Params)` -> `k<T, 1>`: no return type, parameters or crosslayer::."""
    name = demangled.removeprefix("void ")
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name.replace("crosslayer::", "")


def is_cubin(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(20)
    return head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 190  # EM_CUDA


def cubins(cuobjdump: str, path: str, arch: str, workdir: str) -> list[str]:
    """The arch's cubins in `path`: itself if it is one, else extracted into workdir."""
    if is_cubin(path):
        held = re.findall(r"\.(sm_\w+)\.cubin", run([cuobjdump, "-lelf", path]))
        if held[-1:] != [arch]:
            raise ValueError(f"{path} holds {held[-1] if held else 'unknown'} code, not {arch}; pass --arch")
        return [path]
    run([cuobjdump, "-arch", arch, "-xelf", "all", os.path.abspath(path)], cwd=workdir)
    found = sorted(glob.glob(os.path.join(workdir, "*.cubin")))
    if not found:
        listing = run([cuobjdump, "-lelf", path]).strip() or "none"
        raise ValueError(f"no {arch} code in {path}; its ELF images: {listing}")
    return found


def resources(cuobjdump: str, cubin: str) -> dict[str, tuple[int, int]]:
    """Mangled kernel name -> (registers per thread, SHARED bytes) from -res-usage."""
    text = run([cuobjdump, "-res-usage", cubin])
    return {m[0]: (int(m[1]), int(m[2]))
            for m in re.findall(r"Function (\S+):\s+REG:(\d+) STACK:\d+ SHARED:(\d+)", text)}


def elf_info(cuobjdump: str, cubin: str) -> tuple[bool, dict[str, dict[str, str]]]:
    """(whether static shared sections include the reserved 1 KB,
    mangled name -> {EIATTR name: value text} of its .nv.info section) from -elf."""
    reserved_mapped, info, current, attr = False, {}, None, None
    with subprocess.Popen([cuobjdump, "-elf", cubin], stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            reserved_mapped = reserved_mapped or ".nv.reservedSmem" in line
            if not line[0].isspace():  # a section's name starts its dump
                current = line.strip()[len(".nv.info."):] if line.startswith(".nv.info.") else None
                if current:
                    info[current] = {}
            elif current and line.startswith("\tAttribute:"):
                attr = line.split()[-1]
            elif current and line.startswith("\tValue:"):
                info[current].setdefault(attr, line.split(":", 1)[1].strip())
    if proc.returncode:
        raise RuntimeError(f"cuobjdump -elf {cubin} failed ({proc.returncode})")
    return reserved_mapped, info


def launch_bounds(attrs: dict[str, str]) -> tuple[int | None, int | None]:
    """(max threads per block, register cap below 255) from a kernel's .nv.info attributes."""
    dims = attrs.get("EIATTR_MAX_THREADS")
    max_threads = None
    if dims:
        max_threads = 1
        for d in dims.split():
            max_threads *= int(d, 16)
    cap = int(attrs["EIATTR_MAXREG_COUNT"], 16) if "EIATTR_MAXREG_COUNT" in attrs else None
    return max_threads, cap if cap is not None and cap < MAX_REGS_PER_THREAD else None


def access_bytes(parts: list[str]) -> int:
    """Bytes one thread moves in a load/store, from its opcode's modifiers."""
    return next((WIDTH_BYTES[p] for p in parts if p in WIDTH_BYTES), 4)


def operand_widths(opcode: str, n: int) -> list[int]:
    """Registers each operand spans (before any .64 suffix), as far as the opcode says."""
    parts = opcode.split(".")
    family, widths = parts[0], [1] * n
    if family in LOADS:
        widths[0] = max(1, access_bytes(parts) // 4)
    elif family in STORES:
        widths[-1] = max(1, access_bytes(parts) // 4)
    elif family in FP64:
        widths = [2] * n
    elif family == "IMAD" and "WIDE" in parts:
        widths[0] = 2
        if n > 3:
            widths[3] = 2
    elif family == "CS2R" and "32" not in parts:
        widths[0] = 2
    elif family == "HMMA" and len(parts) > 1:
        a, b = HMMA_AB.get(parts[1], (1, 1))
        acc = 4 if "F32" in parts else 2
        widths = [acc, a, b, acc][:n] + [1] * (n - 4)
    return widths


def registers(operand: str, width: int) -> set[int]:
    regs = set()
    for m in REG.finditer(operand):
        base = int(m.group(1))
        regs.update(range(base, base + (2 if m.group(2) else width)))
    return regs


def dest_index(family: str, operands: list[str]) -> int | None:
    """Which operand is the written register: the first, if it is a register; the second
    for `OP Pd, Rd, ...` forms; none for stores, branches and predicate-only results."""
    if family in NO_DEST or not operands:
        return None
    if PLAIN_REG.fullmatch(operands[0]):
        return 0
    if family in PRED_THEN_DEST and len(operands) > 1 and PLAIN_REG.fullmatch(operands[1]):
        return 1
    return None


def predicates_written(family: str, operands: list[str]) -> frozenset:
    """Predicate registers an instruction may write: those leading its operands, or right
    after a register result (`ISETP P0, PT, ..`, `IADD3 R4, P0, ..`); all for R2P. Branches
    read theirs. Over-approximate: a predicate read there counts as written too."""
    if family == "R2P":
        return frozenset(f"P{i}" for i in range(7))
    if family in BLOCK_ENDS or not operands:
        return frozenset()
    start = 1 if PLAIN_REG.fullmatch(operands[0]) else 0
    written = set()
    for op in operands[start:]:
        m = PRED.fullmatch(op)
        if not m:
            break
        written.add(m.group(1))
    return frozenset(written)


def parse_instruction(line: str) -> Instr | None:
    """One line of cuobjdump -sass, or None for anything else."""
    m = INSTR.match(line)
    if not m:
        return None
    addr, pred, opcode, rest = int(m.group(1), 16), m.group(2), m.group(3), m.group(4)
    operands = [o.strip() for o in rest.split(",")] if rest.strip() else []
    parts = opcode.split(".")
    widths = operand_widths(opcode, len(operands))
    d = dest_index(parts[0], operands)
    srcs, dests = set(), set()
    for i, (op, w) in enumerate(zip(operands, widths)):
        (dests if i == d else srcs).update(registers(op, w))
    predicated = bool(pred) and pred.strip() != "@PT"
    target = int(operands[-1], 16) if parts[0] in JUMPS and operands and operands[-1].startswith("0x") else None
    ends_block = parts[0] in BLOCK_ENDS
    # `BRA 0x..` alone is unconditional; `BRA.DIV UR4, 0x..` or `BRA.U !UP0, 0x..` are not;
    # a CALL returns, or (`@P0 CALL.REL.NOINC` past a loop's back branch) exits the loop
    unconditional = (ends_block and not predicated and parts[0] != "CALL"
                     and (parts[0] != "BRA" or len(operands) == 1))
    return Instr(addr, opcode, pred.strip()[1:] if predicated else None, frozenset(srcs), frozenset(dests),
                 target, ends_block, not unconditional, predicates_written(parts[0], operands))


def sass(cuobjdump: str, cubin: str, names: set[str]) -> dict[str, list[Instr]]:
    """Mangled kernel name -> its instructions, for the kernels in names. (The whole cubin
    is disassembled: cuobjdump's -fun costs more than that past a few kernels.)"""
    code, current = {}, None
    for line in run([cuobjdump, "-sass", cubin]).splitlines():
        head = re.match(r"\s+Function : (\S+)", line)
        if head:
            current = code.setdefault(head.group(1), []) if head.group(1) in names else None
        elif current is not None:
            ins = parse_instruction(line)
            if ins:
                current.append(ins)
    return code


def negate(pred: str) -> str:
    return pred[1:] if pred.startswith("!") else "!" + pred


def control_flow(code: list[Instr]) -> tuple[list[list[Instr]], list[dict[int, str | None]]]:
    """Basic blocks (split at branch targets and after branches, calls, exits and returns)
    and each block's successors, each with the guard predicate known false along that edge
    (a branch's own on its fall-through, its negation on the taken edge). A call has both
    its target and its fall-through as successors; a return, none; indirect branches have
    no known successors."""
    index = {ins.addr: i for i, ins in enumerate(code)}
    leaders = {0} | {index[i.target] for i in code if i.target in index}
    leaders |= {k + 1 for k, i in enumerate(code) if i.ends_block and k + 1 < len(code)}
    starts = sorted(leaders)
    blocks = [code[a:b] for a, b in zip(starts, starts[1:] + [len(code)])]
    block_at = {blk[0].addr: b for b, blk in enumerate(blocks)}
    succs = []
    for b, blk in enumerate(blocks):
        last, nxt = blk[-1], {}
        if last.falls_through and b + 1 < len(blocks):
            nxt[b + 1] = last.pred if last.ends_block and not last.opcode.startswith("CALL") else None
        if last.target in block_at:
            nxt[block_at[last.target]] = negate(last.pred) if last.pred else None
        succs.append(nxt)
    return blocks, succs


@dataclass
class Loop:
    blocks: list[list[Instr]]  # the body's basic blocks: the header, then the rest in address order
    forward: list[dict[int, str | None]]  # successors in the body (later positions only) -> predicate false there

    @property
    def instructions(self) -> list[Instr]:
        return [ins for blk in self.blocks for ins in blk]


def natural_loop(preds: dict[int, set[int]], head: int, tail: int) -> set[int] | None:
    """The blocks that reach tail without passing head, and head; None when the entry
    block (0) is among them, i.e. when head does not dominate tail and tail -> head is no
    back edge."""
    body, stack = {head, tail}, [tail]
    while stack:
        b = stack.pop()
        if b == 0 and head != 0:
            return None
        if b != head:
            stack += [p for p in preds[b] if p not in body]
            body.update(preds[b])
    return body


def find_loops(code: list[Instr]) -> list[Loop]:
    """The natural loops: for every branch back to a block that dominates it, the header
    and the blocks that reach the branch without passing the header; loops sharing a
    header are one loop."""
    if not code:
        return []
    blocks, succs = control_flow(code)
    reachable, stack = {0}, [0]
    while stack:
        for s in succs[stack.pop()].keys() - reachable:
            reachable.add(s)
            stack.append(s)
    preds = {b: set() for b in range(len(blocks))}
    for b in reachable:
        for s in succs[b]:
            preds[s].add(b)
    bodies = {}
    for tail in sorted(reachable):
        for head in succs[tail]:
            body = natural_loop(preds, head, tail)
            if body:
                bodies.setdefault(head, set()).update(body)
    loops = []
    for head, body in sorted(bodies.items()):
        order = sorted(body)
        order = order[order.index(head):] + order[:order.index(head)]
        pos = {b: k for k, b in enumerate(order)}
        forward = [{pos[s]: f for s, f in succs[b].items() if s in pos and pos[s] > k} for k, b in enumerate(order)]
        loops.append(Loop([blocks[b] for b in order], forward))
    return loops


def global_load_bytes(ins: Instr) -> int:
    parts = ins.opcode.split(".")
    return access_bytes(parts) if parts[0] in GLOBAL_LOADS else 0


def walk(block: list[Instr], pending: frozenset, value: tuple[int, int],
         false_pred: str | None) -> tuple[frozenset | None, tuple[int, int]]:
    """Run one block on a path: the registers still awaiting their first read and the
    path's (bytes, -loads) so far, or None for the registers once an instruction read one
    (the path's value is then final). Instructions guarded by false_pred do not run, from
    the block's last write of that predicate on."""
    nbytes, neg_loads = value
    skip_from = 0
    if false_pred:
        reg = false_pred.lstrip("!")
        skip_from = max((k + 1 for k, ins in enumerate(block) if reg in ins.pred_writes), default=0)
    for k, ins in enumerate(block):
        if false_pred and k >= skip_from and ins.pred == false_pred:
            continue
        if ins.srcs & pending:
            return None, (nbytes, neg_loads)
        if ins.pred is None:
            pending = pending - ins.dests
        width = global_load_bytes(ins)
        if width:
            pending, nbytes, neg_loads = pending | ins.dests, nbytes + width, neg_loads - 1
    return pending, (nbytes, neg_loads)


def loads_ahead(loop: Loop, max_states: int = 256) -> tuple[int, int]:
    """(loads, bytes) issued from the loop header before the first instruction that reads
    a register one of them wrote, on the path through the body (back edges dropped, so
    nested loops run once) with the most such bytes, ties to the fewest loads (the wider
    loads of a vectorised fast path rather than the scalar loads of its tail). A path's
    states are merged per set of awaited registers; at most max_states per block are kept."""
    best = (0, 0)
    states = [dict() for _ in loop.blocks]  # per block: awaited registers -> best (bytes, -loads)
    states[0][frozenset()] = (0, 0)
    for k, blk in enumerate(loop.blocks):
        edges = loop.forward[k] or {None: None}  # None: the path leaves the body here
        for pending, value in sorted(states[k].items(), key=lambda kv: kv[1], reverse=True)[:max_states]:
            for nxt, false_pred in edges.items():
                regs, val = walk(blk, pending, value, false_pred)
                if regs is None or nxt is None:
                    best = max(best, val)
                else:
                    states[nxt][regs] = max(states[nxt].get(regs, val), val)
    return -best[1], best[0]


def analyse(code: list[Instr]) -> tuple[list[dict], int]:
    """Each loop's figures, and the global loads outside every loop. A loop's `own_loads`
    leave out the loads of loops nested in it; `depth` counts the loops around it."""
    loops = find_loops(code)
    bodies = [lp.instructions for lp in loops]
    addrs = [frozenset(i.addr for i in body) for body in bodies]
    out = []
    for loop, body, mine in zip(loops, bodies, addrs):
        inner = set().union(*(a for a in addrs if a < mine))
        ahead, ahead_bytes = loads_ahead(loop)
        copies = [i for i in body if i.opcode.split(".")[0] in ASYNC_COPIES]
        out.append(dict(header=body[0].addr, first=min(mine), last=max(mine), instructions=len(body),
                        depth=sum(1 for a in addrs if mine < a),
                        loads=sum(1 for i in body if global_load_bytes(i)),
                        own_loads=sum(1 for i in body if global_load_bytes(i) and i.addr not in inner),
                        own_load_widths=sorted({global_load_bytes(i) for i in body
                                                if global_load_bytes(i) and i.addr not in inner}),
                        ahead=ahead, ahead_bytes=ahead_bytes, ldgsts=len(copies),
                        ldgsts_bytes=sum(access_bytes(i.opcode.split(".")) for i in copies)))
    in_loops = set().union(*addrs)
    outside = sum(1 for i in code if global_load_bytes(i) and i.addr not in in_loops)
    return out, outside


def blocks_per_sm(regs: int, threads: int, smem: int, arch: str = "sm_90") -> tuple[int, str]:
    """Resident blocks per SM for `threads` per block, `regs` per thread and `smem` bytes of
    static + dynamic shared memory per block, and what limits it: the names among regs,
    smem, threads, blocks whose own limit equals the result, comma-joined."""
    if arch not in ARCHS:
        raise ValueError(f"no occupancy limits for {arch}; known: {', '.join(ARCHS)}")
    if not 0 < threads <= 1024:
        raise ValueError(f"threads per block must be in 1..1024, not {threads}")
    a = ARCHS[arch]
    warps = -(-threads // WARP)
    regs_per_warp = -(-max(regs, 1) * WARP // REG_UNIT) * REG_UNIT
    fits = (regs <= MAX_REGS_PER_THREAD
            and regs_per_warp * (-(-warps // SUB_PARTITIONS) * SUB_PARTITIONS) <= REGS_PER_BLOCK)
    by_regs = (REGS_PER_SM // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS // warps if fits else 0
    smem_alloc = -(-(smem + SMEM_RESERVED) // SMEM_UNIT) * SMEM_UNIT
    by_smem = a["smem"] // smem_alloc if smem <= a["smem_block"] else 0
    limits = dict(regs=by_regs, smem=by_smem, threads=a["threads"] // WARP // warps, blocks=a["blocks"])
    n = min(limits.values())
    return n, ",".join(k for k, v in limits.items() if v == n)


def matches(regex: str, names: tuple[str, ...]) -> bool:
    return any(re.search(regex, n) for n in names)


def launch_for(names: tuple[str, ...], launches: dict | None) -> tuple[int, int] | None:
    """(threads, dynamic smem) of the first `launches` regex found in one of names."""
    for rx, value in (launches or {}).items():
        if matches(rx, names):
            threads, smem = (value, 0) if isinstance(value, int) else (tuple(value) + (0,))[:2]
            return int(threads), int(smem)
    return None


def kernel_row(mangled: str, demangled: str, arch: str, res: tuple[int, int], reserved_mapped: bool,
               attrs: dict[str, str], code: list[Instr], launches: dict | None) -> dict:
    names = (short_name(demangled), demangled, mangled)
    regs, shared = res
    static_smem = max(shared - SMEM_RESERVED, 0) if reserved_mapped else shared
    max_threads, reg_cap = launch_bounds(attrs)
    loops, outside = analyse(code)
    main = max(loops, key=lambda lp: (lp["own_loads"], -lp["instructions"]), default=None)
    row = dict(kernel=names[0], mangled=mangled, arch=arch, regs=regs, static_smem=static_smem,
               max_threads=max_threads, reg_cap=reg_cap, threads=None, dyn_smem=None, launch=None,
               blocks_per_sm=None, limiter=None, loops=loops, main_loop=main,
               loads_ahead=main["ahead"] if main else None, bytes_per_thread=main["ahead_bytes"] if main else None,
               vec_ahead_min=min((lp["ahead"] for lp in loops if lp["own_load_widths"] == [16] and lp["depth"] >= 1),
                                 default=None),
               bytes_per_sm=None, loads_outside_loops=outside)
    given = launch_for(names, launches)
    if given:
        row.update(threads=given[0], dyn_smem=given[1], launch="given")
    elif max_threads:
        row.update(threads=max_threads, dyn_smem=0, launch="launch bounds")
    if row["threads"]:
        if max_threads and row["threads"] > max_threads:
            row.update(blocks_per_sm=0, limiter="launch bounds")
        else:
            n, limiter = blocks_per_sm(regs, row["threads"], static_smem + row["dyn_smem"], arch)
            row.update(blocks_per_sm=n, limiter=limiter)
        if main:
            row["bytes_per_sm"] = main["ahead_bytes"] * row["threads"] * row["blocks_per_sm"]
    return row


def report(path: str, arch: str = "sm_90", kernel_regex: str | None = None,
           launches: dict | None = None) -> list[dict]:
    """One dict per kernel in `path` (a fatbinary such as _C*.so, or a .cubin) for `arch`
    whose name matches kernel_regex. launches maps a name regex to threads per block or
    (threads, dynamic smem bytes); the first match applies. A regex matches a kernel when
    re.search finds it in the name as printed (`k<float, 4>`), in the demangled name
    (`void crosslayer::k<float, 4>(crosslayer::P)`) or in the mangled one.

    Each dict: kernel, mangled, arch, regs, static_smem, max_threads and reg_cap (launch
    bounds, None if absent), threads, dyn_smem and launch ("given", "launch bounds" or None
    when unknown), blocks_per_sm and limiter, loops (one dict per loop: header, first, last,
    instructions, depth, loads, own_loads, ahead, ahead_bytes, ldgsts, ldgsts_bytes),
    main_loop (one of loops, or None), loads_ahead and bytes_per_thread (the main loop's),
    bytes_per_sm, loads_outside_loops."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if arch not in ARCHS:
        raise ValueError(f"no occupancy limits for {arch}; known: {', '.join(ARCHS)}")
    cuobjdump = find_cuobjdump()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for cubin in cubins(cuobjdump, path, arch, workdir):
            res = resources(cuobjdump, cubin)
            names = sorted(res)
            demangled = dict(zip(names, demangle(names)))
            chosen = [n for n in names if not kernel_regex
                      or matches(kernel_regex, (short_name(demangled[n]), demangled[n], n))]
            if not chosen:
                continue
            reserved_mapped, info = elf_info(cuobjdump, cubin)
            code = sass(cuobjdump, cubin, set(chosen))
            rows += [kernel_row(n, demangled[n], arch, res[n], reserved_mapped, info.get(n, {}),
                                code.get(n, []), launches) for n in chosen]
    return sorted(rows, key=lambda r: r["kernel"])


def fmt(value, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value}{suffix}"


COLUMNS = [("kernel", "<"), ("regs", ">"), ("smem", ">"), ("bounds", ">"), ("threads", ">"), ("dyn", ">"),
           ("blk/SM", ">"), ("limiter", "<"), ("ld-ahead", ">"), ("B/thr", ">"), ("B/SM", ">"), ("ld16-min", ">"),
           ("ld-out", ">")]


def table_cells(r: dict) -> list[str]:
    mark = "*" if r["launch"] == "launch bounds" else ""
    bounds = "-" if r["max_threads"] is None else str(r["max_threads"])
    if r["reg_cap"]:
        bounds += f",r{r['reg_cap']}"
    return [r["kernel"][:90], str(r["regs"]), str(r["static_smem"]), bounds, fmt(r["threads"], mark),
            fmt(r["dyn_smem"], mark), fmt(r["blocks_per_sm"]), r["limiter"] or "n/a",
            "-" if r["main_loop"] is None else str(r["loads_ahead"]),
            "-" if r["main_loop"] is None else str(r["bytes_per_thread"]),
            "-" if r["main_loop"] is None else fmt(r["bytes_per_sm"]), fmt(r["vec_ahead_min"]),
            str(r["loads_outside_loops"])]


def loop_line(lp: dict) -> str:
    line = (f"    {'  ' * lp['depth']}loop @{lp['header']:#06x} ({lp['first']:#06x}-{lp['last']:#06x}, "
            f"{lp['instructions']} instr): {lp['loads']} global loads ({lp['own_loads']} outside nested "
            f"loops), {lp['ahead']} ahead of first use ({lp['ahead_bytes']} B)")
    return line + (f", {lp['ldgsts']} LDGSTS ({lp['ldgsts_bytes']} B)" if lp["ldgsts"] else "")


def format_table(rows: list[dict], verbose: bool = False) -> str:
    cells = [table_cells(r) for r in rows]
    width = [max([len(name)] + [len(c[i]) for c in cells]) for i, (name, _) in enumerate(COLUMNS)]
    line = lambda vals: "  ".join(f"{v:{a}{w}}" for v, (_, a), w in zip(vals, COLUMNS, width)).rstrip()
    out = [line([name for name, _ in COLUMNS])]
    for r, c in zip(rows, cells):
        out.append(line(c))
        if verbose:
            out += [loop_line(lp) for lp in r["loops"]]
    out.append(f"{len(rows)} kernel{'s' * (len(rows) != 1)}. smem: static bytes (reserved 1 KB excluded); bounds: launch bounds' max "
               "threads[,register cap];\nld-ahead: global loads of the main loop issued before the first use of "
               "any; B/thr, B/SM: their bytes per thread, per SM;\nld16-min: the fewest loads ahead of first use "
               "in any nested loop whose own global loads are all 16-byte (every vectorised fast path keeps at least "
               "that many in flight); ld-out: global loads outside loops.")
    if any(r["launch"] == "launch bounds" for r in rows):
        out.append("* not given with --launch: threads = launch bounds' max, no dynamic shared memory.")
    return "\n".join(out)


CSV_FIELDS = ["kernel", "mangled", "arch", "regs", "static_smem", "max_threads", "reg_cap", "threads", "dyn_smem",
              "launch", "blocks_per_sm", "limiter", "loads_ahead", "bytes_per_thread", "bytes_per_sm",
              "vec_ahead_min", "loads_outside_loops"]


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS + ["loops", "main_loop"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            main = r["main_loop"] and f"{r['main_loop']['header']:#x}"
            w.writerow({**r, "loops": len(r["loops"]), "main_loop": main})


def parse_launch(text: str) -> tuple[str, tuple[int, int]]:
    """`NAME_REGEX=THREADS[,SMEM_BYTES]` -> (regex, (threads, smem))."""
    m = re.fullmatch(r"(.+)=(\d+)(?:,(\d+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--launch wants NAME_REGEX=THREADS[,SMEM_BYTES], not {text!r}")
    return m.group(1), (int(m.group(2)), int(m.group(3) or 0))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", help="fatbinary or .cubin (default: the built crosslayer/_C*.so)")
    ap.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    ap.add_argument("--kernel", help="regex searched in the kernel names (printed, demangled or mangled)")
    ap.add_argument("--launch", action="append", type=parse_launch, default=[],
                    help="NAME_REGEX=THREADS[,SMEM_BYTES]: launch config of the kernels it matches (repeatable)")
    ap.add_argument("--csv", help="also write the rows to this CSV file")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every loop of every kernel")
    args = ap.parse_args(argv)
    try:
        rows = report(args.so or default_so(), args.arch, args.kernel, dict(args.launch))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"sass_report: {e}")
    print(format_table(rows, args.verbose))
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
