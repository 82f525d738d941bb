"""Shared test setup.

- Tests marked `gpu` need a CUDA device and are skipped without one; on a machine
  with a GPU they also require the fused kernels to be built (they fail otherwise).
- Every test gets its own seed, derived from its node id: inputs differ from test to
  test yet a failure reproduces exactly.
"""

import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
