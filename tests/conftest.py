"""Shared test setup.

- Tests marked `gpu` need a CUDA device and are skipped without one; on a machine
  with a GPU they also require the fused kernels to be built (they fail otherwise).
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


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


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
