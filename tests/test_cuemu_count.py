"""The traffic counter's own checks (tools/cuemu/count_rt.cpp, tools/cuemu/count.py):
kernels written for the purpose (tests/cuemu_selftest/selftest.cu) whose global traffic
is known by hand -- a 16-byte copy, the same copy through the scalar path, a strided
gather, a broadcast read, a misaligned copy -- and ATen ops whose bytes follow from
their shapes. Without these, a count could be off and bench/traffic.py would not know."""

import importlib.util
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.cuemu

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def count():
    return _load("cuemu_count_py", os.path.join(ROOT, "tools", "cuemu", "count.py"))


@pytest.fixture(scope="module")
def counter(count):
    build = _load("cuemu_build", os.path.join(ROOT, "tools", "cuemu", "build.py"))
    return build.load_counter()


@pytest.fixture(scope="module")
def st(counter):
    build = _load("cuemu_build", os.path.join(ROOT, "tools", "cuemu", "build.py"))
    return build.load(name="cuemu_selftest", src_root=os.path.join(HERE, "cuemu_selftest"))


def launch(count, counter, st, *args):
    """The one kernel row of st.traffic(*args), with its allocations keyed by role."""
    inp = args[1]
    with count.counting(counter) as c:
        out = st.traffic(*args)
    (row,) = c.kernels()
    ids = {counter.allocation_of(inp.data_ptr())[0]: "in", counter.allocation_of(out.data_ptr())[0]: "out"}
    allocs = {ids[a["id"]]: a for a in row.detail["allocs"]}
    return row, allocs


def test_copy_16_byte_accesses(count, counter, st):
    n = 4096
    x = torch.randn(n)
    row, a = launch(count, counter, st, "copy4", x, n, 1, 0, 256, 4)
    d = row.detail
    assert set(a) == {"in", "out"}  # nothing else is global memory
    warps = n // 4 // 32
    assert (d["ld_requests"], d["st_requests"]) == (warps, warps)  # one 16-byte access a lane
    assert d["ld_sectors"] == d["ld_ideal_sectors"] == 16 * warps   # 512 B a warp: 16 sectors
    assert d["st_sectors"] == d["st_ideal_sectors"] == 16 * warps
    assert (d["ld_bytes"], d["st_bytes"]) == (4 * n, 4 * n)
    assert a["in"]["ld_unique_sectors"] == 4 * n // 32 and a["in"]["st_unique_sectors"] == 0
    assert a["out"]["st_unique_sectors"] == 4 * n // 32 and a["out"]["ld_unique_sectors"] == 0
    assert (row.read, row.written) == (4 * n, 4 * n)


def test_scalar_path_takes_four_requests_for_one(count, counter, st):
    n = 4096
    row, a = launch(count, counter, st, "copy4", torch.randn(n), n, 1, 1, 256, 4)
    d = row.detail
    warps = n // 4 // 32
    # four 4-byte accesses a lane, each request 32 lanes 16 bytes apart: 16 sectors for
    # 128 distinct bytes (4 ideal); HBM traffic the same as the vector copy's
    assert d["ld_requests"] == 4 * warps and d["ld_sectors"] == 64 * warps
    assert d["ld_ideal_sectors"] == 16 * warps
    assert a["in"]["ld_unique_sectors"] == 4 * n // 32 and a["in"]["ld_l2_sectors"] == 64 * warps
    assert (row.read, row.written) == (4 * n, 4 * n)


def test_vector_value_used_by_element_stays_one_16_byte_load(count, counter, st):
    """The kernels load Vec<T, N> whole and read its elements: the emulator must count one
    16-byte load a lane, as nvcc's LDG.128 (g++'s scalar replacement of aggregates split
    it into eight 2-byte loads until tools/cuemu/build.py turned it off)."""
    n = 4096  # floats: two ways of n/2 floats = n bf16 each
    x = torch.randn(2 * n).to(torch.bfloat16).view(torch.float32)
    row, a = launch(count, counter, st, "vec_ways", x, n, 1, 2, 256, 2)
    d = row.detail
    warps = n // 8 // 32
    assert d["ld_requests"] == 2 * warps  # one 16-byte load a lane a way
    assert d["ld_sectors"] == d["ld_ideal_sectors"] == 2 * 16 * warps
    assert a["in"]["ld_unique_sectors"] == 4 * n // 32  # the whole input, once
    bf = x.view(torch.bfloat16).float().reshape(2, n // 8, 8)  # way, thread, element
    out = st.traffic("vec_ways", x, n, 1, 2, 256, 2)[: n // 8]
    torch.testing.assert_close(out, bf.sum((0, 2)), rtol=1e-5, atol=1e-4)


def test_strided_gather_reads_a_sector_per_element(count, counter, st):
    n, stride = 2048, 8  # 32 bytes apart: every lane in its own sector
    x = torch.randn(n * stride)
    row, a = launch(count, counter, st, "gather", x, n, stride, 0, 128, 4)
    d = row.detail
    warps = n // 32
    assert d["ld_requests"] == warps and d["ld_sectors"] == 32 * warps and d["ld_ideal_sectors"] == 4 * warps
    assert d["st_sectors"] == 4 * warps  # contiguous 4-byte stores: 4 sectors a warp
    assert a["in"]["ld_unique_sectors"] == n and a["in"]["ld_bytes"] == 4 * n
    assert row.read == 32 * n  # HBM moves a whole sector for every 4-byte element


def test_broadcast_read_counts_one_sector_and_no_shared_memory(count, counter, st):
    n, threads, blocks = 2048, 128, 16
    x = torch.randn(64)
    row, a = launch(count, counter, st, "broadcast_read", x, n, 1, 0, threads, blocks)
    d = row.detail
    warps = threads // 32 * blocks
    # thread 0 of each block: in[0]; every thread: in[block % 2]; the shared-memory
    # store and loads are not global traffic
    assert d["ld_requests"] == blocks + warps and d["ld_sectors"] == blocks + warps
    assert d["ld_ideal_sectors"] == blocks + warps
    assert d["ld_bytes"] == 4 * (blocks + blocks * threads)
    assert a["in"]["ld_unique_sectors"] == 1  # in[0] and in[1] share a sector
    assert a["in"]["ld_l2_sectors"] == blocks + warps  # re-read by every block: L2 traffic
    assert row.read == 32


def test_misaligned_copy_takes_the_scalar_path(count, counter, st):
    n = 4096
    base = torch.randn(n + 4)
    x = base[1:n + 1]  # 4 bytes past a 16-byte boundary
    row, a = launch(count, counter, st, "copy4", x, n, 1, 1, 256, 4)
    d = row.detail
    warps = n // 4 // 32
    # request k of warp w: lanes l read byte 4 + 16(32w + l) + 4k: 512 bytes from an
    # address 4 (k = 0..2) or 16 (k = 3) bytes past a sector boundary -> 17 or 16 sectors
    first = [(4 + 16 * 32 * w + 4 * k) for w in range(warps) for k in range(4)]
    want = sum(((f + 16 * 31 + 3) >> 5) - (f >> 5) + 1 for f in first)
    assert d["ld_requests"] == 4 * warps and d["ld_sectors"] == want
    assert a["in"]["ld_unique_sectors"] == (4 + 4 * n - 1) // 32 + 1  # one sector more than aligned


def test_aten_rows_from_schemas(count, counter):
    x, y = torch.randn(64, 32), torch.randn(32)
    with count.counting(counter) as c:
        z = x + y                   # reads x and y (broadcast, once), writes z
        v = z.t()                   # a view: nothing
        w = torch.empty_like(z)     # an allocation: nothing
        w.copy_(v.t())              # reads z, writes w (not read)
        w.add_(1.0)                 # reads and writes w
        s = torch.zeros(3).expand(64, 3).sum(0)  # zeros writes 12 B; the expanded read counts 12 B
    rows = [(r.name, r.read, r.written, r.launch) for r in c.rows]
    nb = 64 * 32 * 4
    assert ("aten::add.Tensor", nb + 128, nb, True) in rows
    assert ("aten::copy_", nb, nb, True) in rows
    assert ("aten::add_.Tensor", nb, nb, True) in rows  # the 1.0 travels as a wrapped number
    assert ("aten::zeros", 0, 12, True) in rows and ("aten::sum.dim_IntList", 12, 12, True) in rows
    assert c.launches() == 5 and c.launches("kernel") == 0
    assert all(not r.launch and r.bytes == 0 for r in c.rows if r.name in ("aten::t", "aten::empty_like"))
    assert s.shape == (3,)


def test_excluded_region_is_not_counted(count, counter, st):
    x = torch.randn(1024)
    with count.counting(counter) as c:
        with count.excluded():
            st.traffic("copy4", x, 1024, 1, 0, 256, 1)
            _ = x * 2
        _ = x + 1
    assert [r.name for r in c.rows if r.launch] == ["aten::add.Tensor"]


def test_excluded_backward_is_not_counted_in_the_backward_region(count, counter):
    class Uncounted(torch.autograd.Function):  # a stand-in layer, as bench/traffic.py's Block
        @staticmethod
        def forward(ctx, h):
            with count.excluded():
                return h * 2

        @staticmethod
        def backward(ctx, g):
            with count.excluded():
                return g * 2

    x, dy = torch.randn(64, requires_grad=True), torch.ones(64)
    with count.counting(counter) as fwd:
        y = Uncounted.apply(x) + 1
    with count.counting(counter) as bwd:
        torch.autograd.grad(y, x, dy)
    assert [r.name for r in fwd.rows if r.launch] == ["aten::add.Tensor"]
    assert [r.name for r in bwd.rows if r.launch] == []
