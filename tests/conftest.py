"""Shared test setup.

- Tests marked `gpu` need a CUDA device and are skipped without one; on a machine
  with a GPU they also require the fused kernels to run there (they fail otherwise):
  on the backend crosslayer._extension picks, or the one CROSSLAYER_BACKEND forces --
  with CROSSLAYER_BACKEND=jit a test module's `_C` is the JIT path's launchers, so the
  same tests run once per backend (bench/gpu_check.sh does).
  With CROSSLAYER_GPU_TESTS=cuemu they run instead on the CPU with every op's kernels
  on the emulator (tools/cuemu), a test module's `_C` the emulated module, and outputs
  NaN-poisoned: a way to run the GPU tests' own code without a GPU. Tests that need the CUDA runtime itself (streams, graphs,
  synchronisation) fail in that mode; their results say nothing about the kernels.
- Tests marked `cuemu` run the CUDA launchers and kernels on the CPU through
  tools/cuemu (the `cuemu` fixture builds the emulated extension once per session,
  incrementally); they run everywhere, GPU or not, and never skip.
- Every test gets its own seed, derived from its node id: inputs differ from test to
  test yet a failure reproduces exactly.
"""

import importlib.util
import os
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAS_CUDA = torch.cuda.is_available()
GPU_TESTS_ON_CUEMU = os.environ.get("CROSSLAYER_GPU_TESTS") == "cuemu"


def pytest_addoption(parser):
    parser.addoption("--exhaustive", action="store_true",
                     help="also run the tests marked `exhaustive` (the full emulator and compile "
                          "matrices; deselected by default)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not (HAS_CUDA or GPU_TESTS_ON_CUEMU):
            item.add_marker(skip)
    if not config.getoption("--exhaustive"):  # on CUDA (cheap there) every case runs
        def deselected(item):
            on_cuda = getattr(item, "callspec", None) is not None and item.callspec.params.get("backend") == "cuda"
            return "exhaustive" in item.keywords and not on_cuda

        config.hook.pytest_deselected(items=[item for item in items if deselected(item)])
        items[:] = [item for item in items if not deselected(item)]


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def cuemu():
    """The module built by tools/cuemu/build.py: crosslayer._C's functions on CPU tensors,
    running the CUDA kernels on the emulator."""
    spec = importlib.util.spec_from_file_location("cuemu_build", os.path.join(ROOT, "tools", "cuemu", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.load()


@pytest.fixture
def poisoned():
    """While the test runs, every torch.empty / at::empty (the launchers' outputs
    included) is filled with NaN, so an output element a kernel never writes fails
    the policy's NaN check."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.fixture
def gpu_device(request):
    """gpu_device(*ops) -> the device a `gpu` test runs on, after checking that the
    named ops (crosslayer.ops.ALL_OPS names) run fused: CUDA; or, with
    CROSSLAYER_GPU_TESTS=cuemu, the CPU, the ops' kernels on the emulator for the
    test's duration and every torch.empty NaN-filled."""
    from crosslayer import ops

    if not GPU_TESTS_ON_CUEMU:
        from crosslayer import _extension

        def device(*names):
            fused = ops.fused_ops()
            assert all(fused[n] for n in names), f"a GPU is present but no kernels run {names} here: {ops.backends()}"
            return torch.device("cuda")

        if _extension.forced_backend() == "jit" and hasattr(request.module, "_C"):
            # tests that call the launchers directly call the JIT path's
            request.getfixturevalue("monkeypatch").setattr(request.module, "_C", _extension.jit_backend()[0])
        yield device
        return
    from crosslayer._extension import emulate

    module = request.getfixturevalue("cuemu")
    request.getfixturevalue("poisoned")
    if hasattr(request.module, "_C"):  # tests that call the launchers directly
        request.getfixturevalue("monkeypatch").setattr(request.module, "_C", module)
    with emulate(module):
        yield lambda *names: torch.device("cpu")
