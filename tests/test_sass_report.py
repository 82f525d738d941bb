"""tools/sass_report.py: SASS parsing, loops and loads in flight, occupancy arithmetic.

The analysis tests read hand-written SASS and run anywhere. The end-to-end ones compile
small purpose-written kernels with `nvcc -cubin -arch=sm_90` and read them back with
cuobjdump (skipped without either); the last reads the built extension (skipped when it
is absent).
"""

import csv
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sass_report", os.path.join(ROOT, "tools", "sass_report.py"))
sr = importlib.util.module_from_spec(_spec)
sys.modules["sass_report"] = sr
_spec.loader.exec_module(sr)


def code(listing: str) -> list:
    """`ADDR [@Pn] OPCODE operands` per line -> parsed instructions."""
    out = []
    for line in listing.strip().splitlines():
        addr, text = line.split(None, 1)
        ins = sr.parse_instruction(f"        /*{addr}*/                   {text} ;   /* 0x000 */")
        assert ins is not None, line
        out.append(ins)
    return out


def only_loop(listing: str) -> dict:
    loops, _ = sr.analyse(code(listing))
    assert len(loops) == 1, loops
    return loops[0]


# ---------------------------------------------------------------- parsing

def test_operands_of_wide_loads_stores_and_predicated_forms():
    ld, st, shfl, setp, wide, bra = code("""
        0000 @!P0 LDG.E.128.CONSTANT R4, desc[UR12][R16.64]
        0010 STG.E.64 desc[UR6][R2.64], R8
        0020 SHFL.BFLY PT, R3, R2, 0x10, 0x1f
        0030 ISETP.GE.AND P0, PT, R5, UR8, PT
        0040 IMAD.WIDE.U32 R2, R7, 0x4, R10
        0050 @!P0 BRA 0x10
    """)
    assert ld.pred == "!P0" and ld.dests == {4, 5, 6, 7} and ld.srcs == {16, 17}
    assert st.dests == set() and st.srcs == {2, 3, 8, 9}
    assert shfl.dests == {3} and shfl.srcs == {2}
    assert setp.dests == set() and setp.srcs == {5} and "P0" in setp.pred_writes
    assert wide.dests == {2, 3} and wide.srcs == {7, 10, 11}
    assert bra.target == 0x10 and bra.falls_through
    assert sr.access_bytes("LDG.E.U16.CONSTANT".split(".")) == 2
    assert sr.access_bytes("LDG.E.S8".split(".")) == 1
    assert sr.access_bytes("LDG.E.64".split(".")) == 8
    assert sr.access_bytes("LD.E".split(".")) == 4


def test_short_name_drops_return_type_parameters_and_namespace():
    assert (sr.short_name("void crosslayer::k<float, 4>(crosslayer::P)") == "k<float, 4>")
    assert sr.short_name("copy4") == "copy4"


# ---------------------------------------------------------------- loops and loads in flight

def test_loads_before_first_use_with_their_widths():
    lp = only_loop("""
        0000 MOV R0, RZ
        0010 LDG.E.128 R4, desc[UR4][R2.64]
        0020 LDG.E.64 R8, desc[UR4][R2.64+0x10]
        0030 @P1 LDG.E.U16 R10, desc[UR4][R2.64+0x20]
        0040 FADD R0, R0, R7
        0050 LDG.E R11, desc[UR4][R2.64+0x30]
        0060 FADD R0, R0, R11
        0070 @!P0 BRA 0x10
        0080 EXIT
        0090 BRA 0x90
    """)
    # R7 is the last register of the 128-bit load: its read is the first use; the
    # predicated load counts; the load after the use does not
    assert (lp["header"], lp["loads"], lp["ahead"], lp["ahead_bytes"]) == (0x10, 4, 3, 26)


def test_write_only_overwrite_ends_tracking_without_a_use():
    lp = only_loop("""
        0000 LDG.E R4, desc[UR4][R2.64]
        0010 MOV R4, RZ
        0020 @P0 MOV R6, RZ
        0030 LDG.E R6, desc[UR4][R2.64+0x4]
        0040 FADD R0, R4, R4
        0050 LDG.E R8, desc[UR4][R2.64+0x8]
        0060 FADD R0, R6, R8
        0070 @!P1 BRA 0x0
    """)
    # MOV R4 is not a use and ends R4's tracking, so FADD R4 is not one either
    assert (lp["ahead"], lp["ahead_bytes"]) == (3, 12)


def test_predicated_write_keeps_tracking():
    lp = only_loop("""
        0000 LDG.E R4, desc[UR4][R2.64]
        0010 @P0 MOV R4, RZ
        0020 LDG.E R6, desc[UR4][R2.64+0x4]
        0030 FADD R0, R4, R4
        0040 LDG.E R8, desc[UR4][R2.64+0x8]
        0050 @!P1 BRA 0x0
    """)
    assert lp["ahead"] == 2


def test_vector_fast_path_is_preferred_over_its_scalar_tail():
    # load_chunk's shape: a guarded 16-byte load, or four guarded scalar loads; then a use
    lp = only_loop("""
        0000 ISETP.GE.AND P0, PT, R20, R21, PT
        0010 @!P0 LDG.E.128 R4, desc[UR4][R2.64]
        0020 @!P0 BRA 0x80
        0030 CS2R R4, SRZ
        0040 @!P2 LDG.E R4, desc[UR4][R2.64]
        0050 @!P3 LDG.E R5, desc[UR4][R2.64+0x4]
        0060 @!P4 LDG.E R6, desc[UR4][R2.64+0x8]
        0070 @!P5 LDG.E R7, desc[UR4][R2.64+0xc]
        0080 FADD R0, R0, R4
        0090 @!P1 BRA 0x0
    """)
    # 5 load instructions, but one path: 1 x 16 B (fast) or 4 x 4 B (tail), never both
    assert (lp["loads"], lp["ahead"], lp["ahead_bytes"]) == (5, 1, 16)


def test_nested_loops_main_loop_and_loads_outside():
    listing = """
        0000 LDG.E R30, desc[UR4][R2.64]
        0010 FADD R31, R30, R30
        0020 LDG.E R10, desc[UR4][R2.64]
        0030 FADD R11, R10, R10
        0040 LDG.E.128 R4, desc[UR4][R2.64]
        0050 LDG.E.128 R12, desc[UR4][R2.64+0x10]
        0060 FADD R0, R4, R12
        0070 @!P1 BRA 0x40
        0080 @!P0 BRA 0x20
        0090 EXIT
        00a0 BRA 0xa0
    """
    loops, outside = sr.analyse(code(listing))
    outer, inner = sorted(loops, key=lambda lp: lp["header"])
    assert (outer["header"], outer["depth"], outer["loads"], outer["own_loads"]) == (0x20, 0, 3, 1)
    assert (inner["header"], inner["depth"], inner["loads"]) == (0x40, 1, 2)
    assert (inner["ahead"], inner["ahead_bytes"]) == (2, 32)
    assert outer["ahead"] == 1  # R10 is read before the inner loop's loads
    assert outside == 1
    main = max(loops, key=lambda lp: (lp["own_loads"], -lp["instructions"]))
    assert main is inner


def test_call_past_the_back_branch_exits_the_inner_loop():
    loops, _ = sr.analyse(code("""
        0000 MOV R0, RZ
        0010 LDG.E R4, desc[UR4][R2.64]
        0020 LDG.E R6, desc[UR4][R8.64]
        0030 FADD R0, R6, R0
        0040 @P1 CALL.REL.NOINC 0x60
        0050 BRA 0x20
        0060 FADD R0, R4, R0
        0070 @P0 BRA 0x10
        0080 EXIT
    """))
    assert [(lp["header"], lp["depth"], lp["loads"]) for lp in loops] == [(0x10, 0, 2), (0x20, 1, 1)]


def test_backward_branches_that_close_no_natural_loop():
    # out-of-line code branching back into the straight line (as BRA.DIV handlers do)
    assert sr.analyse(code("""
        0000 BRA 0x30
        0010 LDG.E R5, desc[UR4][R2.64]
        0020 EXIT
        0030 @P1 BRA 0x10
        0040 EXIT
        0050 BRA 0x50
    """)) == ([], 1)
    # a cycle entered at two places (0x40 and 0x50): no header dominates it
    assert sr.analyse(code("""
        0000 @P0 BRA 0x40
        0010 LDG.E R4, desc[UR4][R2.64]
        0020 BRA 0x50
        0030 NOP
        0040 LDG.E R5, desc[UR4][R2.64]
        0050 @P1 BRA 0x40
        0060 EXIT
    """)) == ([], 2)


# ---------------------------------------------------------------- occupancy

@pytest.mark.parametrize("regs,threads,smem,blocks,limiter", [
    (128, 256, 0, 2, "regs"),           # 4096 regs a warp, 4 warps a sub-partition -> 16 warps
    (32, 1024, 0, 2, "threads"),        # 64 warps / 32 a block (registers fill exactly too)
    (32, 256, 100 * 1024, 2, "smem"),   # (102400 + 1024 reserved) B a block, 233472 B an SM
    (16, 32, 0, 32, "blocks"),
    (80, 32, 0, 24, "regs"),            # 6 warps in each 16384-register sub-partition, not 65536 / 2560 = 25
    (255, 256, 0, 1, "regs"),
    (32, 128, 48 * 1024 - 1, 4, "smem"),  # rounded up to 128 B: 50176 B a block
])
def test_blocks_per_sm(regs, threads, smem, blocks, limiter):
    n, limited_by = sr.blocks_per_sm(regs, threads, smem)
    assert n == blocks and limiter in limited_by.split(","), (n, limited_by)


def test_blocks_per_sm_limits_and_errors():
    assert sr.blocks_per_sm(32, 256, 228 * 1024)[0] == 0   # over 227 KB a block
    assert sr.blocks_per_sm(32, 128, 0, "sm_80")[0] == 16  # 2048 threads / 128
    with pytest.raises(ValueError, match="1..1024"):
        sr.blocks_per_sm(32, 2048, 0)
    with pytest.raises(ValueError, match="sm_70"):
        sr.blocks_per_sm(32, 256, 0, "sm_70")


def test_parse_launch():
    assert sr.parse_launch("copy4=128,4096") == ("copy4", (128, 4096))
    assert sr.parse_launch("k<float, 4>=256") == ("k<float, 4>", (256, 0))
    with pytest.raises(Exception, match="NAME_REGEX"):
        sr.parse_launch("copy4")


# ---------------------------------------------------------------- compiled kernels

KERNELS = r"""
extern "C" __global__ void copy4(const float4* __restrict__ in, float4* __restrict__ out, int n) {
  const int stride = gridDim.x * blockDim.x;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i + 3 * stride < n; i += 4 * stride) {
    float4 v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = in[i + j * stride];
#pragma unroll
    for (int j = 0; j < 4; ++j) out[i + j * stride] = v[j];
  }
}

extern "C" __global__ void copy1(const float4* __restrict__ in, float4* __restrict__ out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float4 v = in[i];
    v.x += 1.f;
    out[i] = v;
  }
}

extern "C" __global__ void __launch_bounds__(256, 2) bounded(const float* __restrict__ in, float* out) {
  __shared__ float s[512];
  s[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x * 7) % 512];
}
"""


def nvcc() -> str | None:
    path = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return path if os.access(path, os.X_OK) else shutil.which("nvcc")


@pytest.fixture(scope="module")
def cuobjdump():
    try:
        return sr.find_cuobjdump()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def cubin(cuobjdump, tmp_path_factory):
    if nvcc() is None:
        pytest.skip("needs nvcc ($CUDA_HOME/bin/nvcc or on PATH) to compile the test kernels")
    d = tmp_path_factory.mktemp("sass_report")
    (d / "k.cu").write_text(KERNELS)
    out = subprocess.run([nvcc(), "-cubin", "-arch=sm_90", "-o", str(d / "k.cubin"), str(d / "k.cu")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return str(d / "k.cubin")


@pytest.fixture(scope="module")
def rows(cubin):
    return {r["kernel"]: r for r in sr.report(cubin, launches={"copy4": (128, 4096), "copy1": 512})}


def test_copy_loops_loads_in_flight(rows):
    for name, loads, nbytes in [("copy4", 4, 64), ("copy1", 1, 16)]:
        r = rows[name]
        assert len(r["loops"]) == 1, r["loops"]
        assert (r["loads_ahead"], r["bytes_per_thread"], r["loads_outside_loops"]) == (loads, nbytes, 0), name


def test_given_launch_sets_occupancy_and_bytes_per_sm(rows):
    r = rows["copy4"]
    assert (r["threads"], r["dyn_smem"], r["launch"]) == (128, 4096, "given")
    assert (r["blocks_per_sm"], r["limiter"]) == sr.blocks_per_sm(r["regs"], 128, 4096)
    assert r["bytes_per_sm"] == 64 * 128 * r["blocks_per_sm"]
    assert (rows["copy1"]["threads"], rows["copy1"]["dyn_smem"]) == (512, 0)


def test_launch_bounds_static_smem_and_default_occupancy(rows):
    r = rows["bounded"]
    assert (r["max_threads"], r["reg_cap"]) == (256, 128)     # 65536 / (256 x 2)
    assert r["static_smem"] == 2048                           # not sm_90's 3072 with the reserved 1 KB
    assert (r["threads"], r["dyn_smem"], r["launch"]) == (256, 0, "launch bounds")
    assert r["regs"] <= 32  # so: 8 blocks of 8 warps fill the 64 warp slots
    assert (r["blocks_per_sm"], r["limiter"]) == (8, "threads")
    assert r["main_loop"] is None and r["loads_outside_loops"] == 1


def test_cli_table_and_csv(cubin, tmp_path, capsys):
    sr.main(["--so", cubin, "--kernel", "copy", "--launch", "copy4=256", "--csv", str(tmp_path / "r.csv"), "-v"])
    out = capsys.readouterr().out
    assert "copy4" in out and "copy1" in out and "bounded" not in out and "loop @" in out
    with open(tmp_path / "r.csv") as f:
        table = {r["kernel"]: r for r in csv.DictReader(f)}
    assert table["copy4"]["threads"] == "256" and table["copy4"]["bytes_per_thread"] == "64"
    assert table["copy1"]["blocks_per_sm"] == ""


def test_wrong_arch_is_a_clear_error(cubin):
    with pytest.raises(ValueError, match="holds sm_90 code, not sm_80"):
        sr.report(cubin, arch="sm_80")


def test_built_extension(cuobjdump):
    try:
        so = sr.default_so()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    found = sr.report(so, kernel_regex="depth_aggregate_bwd_kernel")
    assert found, f"no depth_aggregate_bwd_kernel in {so}"
    for r in found:
        assert r["regs"] > 0 and r["max_threads"], r["kernel"]
        assert r["main_loop"] is not None and r["loads_ahead"] >= 1, r["kernel"]
        assert r["blocks_per_sm"] >= 1, r["kernel"]


def test_depth_slot_loops_keep_four_loads_in_flight(cuobjdump):
    """Issue 14's count, guarded: every vectorised slot loop of the 16-bit depth kernels
    (depth_aggregate and depth_aggregate_qkv_norm, forward and backward, the qkv_norm
    kernels on aligned and on shifted rows, its backward with and without its slot
    stage) issues at least four 16-byte loads before it uses any. Before the slot
    batches, the backward's slot loop had one."""
    try:
        so = sr.default_so()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    found = sr.report(so, kernel_regex=r"depth_aggregate(_qkv_norm)?_(fwd|bwd)_kernel<(__nv_bfloat16|__half), 8")
    assert len(found) == 20, [r["kernel"] for r in found]  # 8 depth_aggregate, 2·2 + 2·4 qkv_norm
    for r in found:
        assert r["vec_ahead_min"] is not None and r["vec_ahead_min"] >= 4, (r["kernel"], r["vec_ahead_min"])
