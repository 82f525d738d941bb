"""Which backend runs an op on CUDA tensors (crosslayer._extension.select_backend): the
extension when built for the GPU, else the JIT path for the ops it covers, else the
oracle; CROSSLAYER_BACKEND forcing one, with clear errors when the forced one cannot
run; and what `python -m crosslayer.info` and ops.backends() report. The extension and
the JIT path are stood in for, so every case runs on any machine."""

import types

import pytest

from crosslayer import _extension, ops

FAKE_JIT = types.SimpleNamespace(OPS=("hc_post",))


@pytest.fixture
def stand_ins(monkeypatch):
    """set(extension=bool, archs=str, jit=bool): _C, its recorded architectures and the
    JIT path present or not."""
    monkeypatch.delenv("CROSSLAYER_BACKEND", raising=False)

    def set_(extension: bool, archs: str = "8.0;9.0", jit: bool = True):
        monkeypatch.setattr(_extension, "_C", object() if extension else None)
        monkeypatch.setattr(_extension, "build_info", lambda: {"cuda_archs": archs})
        _extension.extension_covers.cache_clear()
        monkeypatch.setattr(_extension, "jit_backend",
                            lambda: (FAKE_JIT, "") if jit else (None, "CuPy is not importable (test)"))

    yield set_
    _extension.extension_covers.cache_clear()


@pytest.mark.parametrize("extension,archs,jit,capability,want_post,want_pre", [
    (True, "8.0;9.0", True, (9, 0), "extension", "extension"),
    (True, "8.0;9.0", False, None, "extension", "extension"),   # no GPU visible: what a covered one runs
    (True, "8.0", True, (9, 0), "jit", "oracle"),                # built for another GPU
    (True, "8.0+PTX", True, (9, 0), "jit", "oracle"),            # as info's GPU line: not built for 9.0
    (True, "9.0+PTX", False, (9, 0), "extension", "extension"),
    (True, "8.0 9.0", False, (9, 0), "extension", "extension"),   # TORCH_CUDA_ARCH_LIST's spaces
    (True, "8.6", True, (8, 9), "jit", "oracle"),
    (True, "9.0a", True, (9, 0), "extension", "extension"),
    (False, "", True, (9, 0), "jit", "oracle"),
    (False, "", False, (9, 0), "oracle", "oracle"),
])
def test_automatic_choice(stand_ins, extension, archs, jit, capability, want_post, want_pre):
    stand_ins(extension, archs, jit)
    assert _extension.select_backend("hc_post", capability) == want_post
    assert _extension.select_backend("hc_pre", capability) == want_pre


def test_forced_backends(stand_ins, monkeypatch):
    stand_ins(True, "8.0", True)
    monkeypatch.setenv("CROSSLAYER_BACKEND", "oracle")
    assert _extension.select_backend("hc_post", (8, 0)) == "oracle"
    monkeypatch.setenv("CROSSLAYER_BACKEND", "jit")
    assert [_extension.select_backend(op, (8, 0)) for op in ("hc_post", "hc_pre")] == ["jit", "oracle"]
    monkeypatch.setenv("CROSSLAYER_BACKEND", "extension")
    assert _extension.select_backend("hc_post", (9, 0)) == "extension"  # forced even where not built for


def test_a_forced_backend_that_cannot_run_says_why(stand_ins, monkeypatch):
    stand_ins(False, "", False)
    monkeypatch.setenv("CROSSLAYER_BACKEND", "extension")
    with pytest.raises(RuntimeError, match="CROSSLAYER_BACKEND=extension but crosslayer._C is not built"):
        _extension.select_backend("hc_post", (9, 0))
    monkeypatch.setenv("CROSSLAYER_BACKEND", "jit")
    with pytest.raises(RuntimeError, match=r"CROSSLAYER_BACKEND=jit but the JIT path cannot run here: CuPy"):
        _extension.select_backend("hc_post", (9, 0))
    monkeypatch.setenv("CROSSLAYER_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"CROSSLAYER_BACKEND='fast': choose one of extension, jit, oracle"):
        _extension.select_backend("hc_post", (9, 0))


def test_ops_backends_and_fused_ops(stand_ins, monkeypatch):
    stand_ins(False, "", True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert ops.backends() == {op: "jit" if op == "hc_post" else "oracle" for op in ops.ALL_OPS}
    assert ops.fused_ops() == {op: op == "hc_post" for op in ops.ALL_OPS}


def test_info_names_each_ops_backend(stand_ins, monkeypatch):
    from crosslayer import info

    stand_ins(False, "", False)
    monkeypatch.setattr(info, "jit_backend", _extension.jit_backend)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    text = info.report()
    assert "JIT path         unavailable: CuPy is not importable (test)" in text
    assert "hc_post: oracle" in text and "mudd_weights: oracle" in text
    monkeypatch.setenv("CROSSLAYER_BACKEND", "oracle")
    assert "forced by CROSSLAYER_BACKEND=oracle" in info.report()


def test_the_real_jit_path_is_found_or_says_why():
    jit, why = _extension.jit_backend()
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert jit is None and "CuPy is not importable" in why
    else:
        assert (jit is not None and "hc_post" in jit.OPS) or why
