"""The emulator's own checks (tools/cuemu): results it must compute, and broken CUDA
code it must refuse. Without these, an emulated test that passes could mean the
emulator checks nothing. Kernels: tests/cuemu_selftest/selftest.cu."""

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.cuemu

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def st():
    spec = importlib.util.spec_from_file_location("cuemu_build", os.path.join(HERE, "..", "tools", "cuemu", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.load(name="cuemu_selftest", src_root=os.path.join(HERE, "cuemu_selftest"))


def test_warp_shuffles_sum_and_broadcast(st):
    x = torch.randn(75)
    out = st.run("warp_sum", x, 96, 0, 0, False)
    for w in range(3):
        want = x[32 * w : 32 * (w + 1)].sum()
        n = min(32, 75 - 32 * w)
        torch.testing.assert_close(out[32 * w : 32 * w + n], want.expand(n), rtol=1e-6, atol=1e-5)
    assert (out[75:] == -1).all()  # threads past n write nothing


def test_barrier_orders_shared_memory(st):
    x = torch.tensor([3.5])
    assert (st.run("broadcast", x, 64, 4, 0, False) == 3.5).all()


def test_missing_barrier_reads_poison(st, monkeypatch):
    x = torch.tensor([3.5])
    out = st.run("broadcast", x, 64, 4, 1, False)  # reverse order: thread 0 writes last
    assert torch.isnan(out[1:]).all() and out[0] == 3.5
    monkeypatch.setenv("CUEMU_ORDER", "forward")
    assert (st.run("broadcast", x, 64, 4, 1, False) == 3.5).all()  # why the default is reverse


def test_syncthreads_after_exit_is_refused(st):
    with pytest.raises(RuntimeError, match=r"__syncthreads after 32 threads of its block exited"):
        st.run("exit_then_sync", torch.zeros(64), 96, 0, 0, False)


def test_shuffle_with_exited_lanes_is_refused(st):
    with pytest.raises(RuntimeError, match=r"__shfl_xor_sync at .*selftest.cu.cpp:45 with mask 0xffffffff but lanes 0xffff0000 of the warp exited"):
        st.run("exit_then_sync", torch.zeros(16), 32, 0, 1, False)


def test_deadlock_is_reported(st):
    with pytest.raises(RuntimeError, match=r"waits at __syncthreads|exited"):
        st.run("deadlock", torch.zeros(1), 64, 0, 0, False)


def test_misaligned_global_access_is_refused(st):
    """A GPU faults on a 16-byte access that is not 16-byte aligned (the vector paths'
    contract); the CPU would not, so the emulator checks every global access."""
    x = torch.randn(65)
    torch.testing.assert_close(st.traffic("copy4", x[:64], 64, 1, 0, 16, 1), x[:64])  # aligned: one float4 each
    with pytest.raises(RuntimeError, match=r"misaligned 16-byte load from global address 0x[0-9a-f]+ \(4 bytes past a 16-byte boundary\)"):
        st.traffic("copy4", x[1:], 64, 1, 0, 16, 1)
    torch.testing.assert_close(st.traffic("copy4", x[1:], 64, 1, 1, 16, 1), x[1:])  # element by element: fine


def test_spin_wait_yields(st):
    """A thread spinning with __nanosleep on another thread's store gives the other
    threads their turn (common/ticket.cuh's waits); one that nobody releases is a
    deadlock, reported."""
    assert st.run("spin", torch.zeros(1), 64, 0, 0, False)[0] == 1
    with pytest.raises(RuntimeError, match=r"__nanosleep at .*selftest.cu"):
        st.run("spin", torch.zeros(1), 64, 0, 1, False)


def test_launch_limits(st):
    x = torch.tensor([1.0])
    with pytest.raises(RuntimeError, match=r"invalid block \(1025,1,1\)"):
        st.run("warp_sum", x, 1025, 0, 0, False)
    with pytest.raises(RuntimeError, match=r"dynamic shared memory 65536 B above the kernel's limit 49152 B"):
        st.run("broadcast", x, 32, 65536, 0, False)
    assert (st.run("broadcast", x, 32, 65536, 0, True) == 1).all()  # after cudaFuncSetAttribute
    with pytest.raises(RuntimeError, match=r"above the opt-in limit"):
        st.run("broadcast", x, 32, 300000, 0, True)
    assert (st.run("bounded", x, 64, 0, 0, False) == 2).all()
    with pytest.raises(RuntimeError, match=r"block of 96 threads above the kernel's __launch_bounds__\(64\)"):
        st.run("bounded", x, 96, 0, 0, False)


def _pack(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two bf16 tensors -> int32 words, lo in the low 16 bits."""
    lo16 = lo.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    hi16 = hi.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return lo16 | (hi16 << 16)


def test_mma_m16n8k16_matches_matmul(st):
    """Fragments packed as the PTX ISA lays them out for mma.m16n8k16 (.bf16, row.col)."""
    A = torch.randn(16, 16).to(torch.bfloat16).float()
    B = torch.randn(16, 8).to(torch.bfloat16).float()
    C = torch.randn(16, 8)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    a = torch.stack([_pack(A[g, 2 * t], A[g, 2 * t + 1]), _pack(A[g + 8, 2 * t], A[g + 8, 2 * t + 1]),
                     _pack(A[g, 2 * t + 8], A[g, 2 * t + 9]), _pack(A[g + 8, 2 * t + 8], A[g + 8, 2 * t + 9])], 1)
    b = torch.stack([_pack(B[2 * t, g], B[2 * t + 1, g]), _pack(B[2 * t + 8, g], B[2 * t + 9, g])], 1)
    c = torch.stack([C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]], 1)
    d = st.mma(a.contiguous(), b.contiguous(), c.contiguous())
    D = A @ B + C
    want = torch.stack([D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]], 1)
    torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-5)
