"""Build behaviour (GitHub issue 2, item 1), CPU-only: the extension/torch mismatch
check, CROSSLAYER_DISABLE_EXTENSION, `python -m crosslayer.info`, and setup.py's CUDA
toolkit discovery and CROSSLAYER_BUILD_CUDA modes. Nothing here compiles or installs;
setup.py is imported as a module (its main() only runs as __main__) with setup() and
the build record's path redirected."""

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import crosslayer
from crosslayer import _extension

ROOT = Path(__file__).resolve().parent.parent
# The package under test: this tree's, even where an editable install points elsewhere.
PKG_PARENT = str(Path(crosslayer.__file__).resolve().parent.parent)
REAL_CUDA = "/usr/local/cuda"
HAS_REAL_CUDA = os.path.isfile(os.path.join(REAL_CUDA, "bin", "nvcc")) and os.path.isfile(
    os.path.join(REAL_CUDA, "include", "cuda_runtime.h"))
needs_real_cuda = pytest.mark.skipif(not HAS_REAL_CUDA,
                                     reason=f"needs a CUDA toolkit at {REAL_CUDA}")


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CROSSLAYER_DISABLE_EXTENSION", None)
    env.update(extra)
    return env


def _run_py(args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(**extra), capture_output=True,
                          text=True, timeout=300, cwd=str(ROOT))


# ------------------------------------------------------------ check_build_matches

def test_mismatch_names_both_versions_and_the_rebuild_command():
    info = {"torch_version": "2.3.0+cu121", "torch_cuda": "12.1", "built_cuda": True}
    with pytest.raises(_extension.ExtensionMismatchError) as ei:
        _extension.check_build_matches(info, "2.14.1+cu130", "13.0")
    msg = str(ei.value)
    assert "2.3.0+cu121" in msg and "2.14.1+cu130" in msg
    assert "12.1" in msg and "13.0" in msg
    assert "pip install --no-build-isolation -e ." in msg
    assert "CROSSLAYER_DISABLE_EXTENSION=1" in msg
    assert isinstance(ei.value, ImportError)


def test_matching_build_passes():
    v, c = torch.__version__, torch.version.cuda
    _extension.check_build_matches({"torch_version": v, "torch_cuda": c}, v, c)
    _extension.check_build_matches({}, v, c)  # no build record: nothing to compare


# ------------------------------------------------------------ disabled extension

def test_disable_extension_leaves_the_jit_path_and_the_oracle():
    code = textwrap.dedent("""
        import torch, crosslayer
        from crosslayer import ops, ref
        from crosslayer._extension import _C
        assert _C is None, _C
        from crosslayer._extension import jit_backend
        fused = ops.fused_ops()
        assert set(fused) == set(ops.ALL_OPS), fused
        jit = jit_backend()[0]  # without _C, the ops the JIT path covers still run fused
        assert fused == {op: jit is not None and op in jit.OPS for op in ops.ALL_OPS}, fused
        devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for dev in devs:
            S = torch.randn(3, 5, 7, device=dev)
            A = torch.randn(5, 4, 3, device=dev)
            assert torch.equal(ops.depth_aggregate(S, A), ref.depth_aggregate(S, A))
            H = torch.randn(5, 2, 7, device=dev)
            A2, B2 = ref.hc_init_static(2, 0, device=dev)
            W = 0.02 * torch.randn(7, 4, device=dev)
            for name in ("hc_pre", "hc_post"):
                if getattr(ops, name, None) is None:
                    print("absent", name)
            if getattr(ops, "hc_pre", None) is not None:
                got = ops.hc_pre(H, A2, B2, W, 0.01, 0.01)
                want = ref.hc_pre(H, A2, B2, W, 0.01, 0.01)
                assert all(torch.allclose(g, w) for g, w in zip(got, want))
                if getattr(ops, "hc_post", None) is not None:
                    x, al, be = want
                    assert torch.allclose(ops.hc_post(H, x, al, be), ref.hc_post(H, x, al, be))
        print("ran on", devs, "fused", fused)
    """)
    p = _run_py(["-c", code], CROSSLAYER_DISABLE_EXTENSION="1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ran on" in p.stdout


def test_bare_checkout_imports_without_extension(tmp_path):
    """A copy of the package with no compiled _C and no build record imports, and
    every op runs on the oracle (the 'from crosslayer import _C' regression)."""
    dst = tmp_path / "crosslayer"
    shutil.copytree(Path(crosslayer.__file__).parent, dst,
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "_build_info.py",
                                                  "__pycache__"))
    code = ("import crosslayer, crosslayer.ops as o; assert crosslayer._C is None; "
            "assert not any(o.fused_ops().values()); print(crosslayer.__file__)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("CROSSLAYER_DISABLE_EXTENSION", None)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    assert str(tmp_path) in p.stdout


# ------------------------------------------------------------ python -m crosslayer.info

def _check_info_output(out: str, disabled: bool) -> None:
    lines = out.splitlines()
    torch_line = next((l for l in lines if l.startswith("torch ")), None)
    assert torch_line is not None, out
    assert torch.__version__ in torch_line
    assert f"CUDA {torch.version.cuda}" in torch_line
    ext = next((l for l in lines if l.startswith("crosslayer._C")), None)
    assert ext is not None and ("built" in ext), out
    if "not built" in ext:
        reason = next((l for l in lines if l.strip().startswith("reason:")), None)
        assert reason is not None and reason.split(":", 1)[1].strip(), out
        if disabled:
            assert "CROSSLAYER_DISABLE_EXTENSION=1" in reason
    else:
        assert not disabled
        assert re.search(r"for sm \d+\.\d+", ext), f"no archs in {ext!r}"
    gpu = next((l for l in lines if l.startswith("GPU ")), None)
    assert gpu is not None, out
    assert next((l for l in lines if l.startswith("JIT path ")), None) is not None, out
    now = next((i for i, l in enumerate(lines) if l.startswith("runs now ")), None)
    assert now is not None, out
    if torch.cuda.is_available():
        head = now
    else:  # built is not running: the oracle now, the per-op backends only "on a GPU"
        assert "none visible" in gpu and "every op on the oracle" in lines[now], out
        head = next((i for i, l in enumerate(lines) if l.startswith("on a GPU ")), None)
    assert head is not None and head + 1 < len(lines), out
    ops_line = lines[head + 1]
    from crosslayer import ops
    for op in ops.ALL_OPS:
        assert re.search(rf"\b{op}: (extension|jit|oracle)\b", ops_line), (op, ops_line)
    if disabled:
        assert "extension" not in ops_line


def test_info_module():
    p = _run_py(["-m", "crosslayer.info"])
    assert p.returncode == 0, p.stdout + p.stderr
    _check_info_output(p.stdout, disabled=False)


def test_info_module_with_extension_disabled():
    p = _run_py(["-m", "crosslayer.info"], CROSSLAYER_DISABLE_EXTENSION="1")
    assert p.returncode == 0, p.stdout + p.stderr
    _check_info_output(p.stdout, disabled=True)


# ------------------------------------------------------------ setup.py discovery

@pytest.fixture
def setup_mod(monkeypatch, tmp_path):
    """setup.py imported as a module, with a clean CUDA environment: no CUDA_HOME /
    CUDA_PATH / CROSSLAYER_BUILD_CUDA, PATH holding only the system dirs (no nvcc),
    the build record redirected to tmp_path and setup() captured."""
    spec = importlib.util.spec_from_file_location("crosslayer_setup_under_test",
                                                  ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() is guarded: nothing builds
    for var in ("CUDA_HOME", "CUDA_PATH", "CROSSLAYER_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}{os.pathsep}/usr/bin{os.pathsep}/bin")
    if shutil.which("nvcc"):
        pytest.skip(f"an nvcc in a system directory ({shutil.which('nvcc')}) would be found")
    monkeypatch.setattr(mod, "BUILD_INFO_PATH", str(tmp_path / "_build_info.py"))
    calls = []
    monkeypatch.setattr(mod, "setup", lambda **kw: calls.append(kw))
    mod.setup_calls = calls
    return mod


def _fake_toolkit(root: Path) -> Path:
    """A directory that passes setup.py's toolkit test (bin/nvcc and
    include/cuda_runtime.h); its nvcc only answers --version."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    _script(root / "bin" / "nvcc", 'echo "Cuda compilation tools, release 99.9, V99.9.0"')
    return root


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _put_on_path(monkeypatch, d: Path) -> None:
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")


def test_dryrun_wrapper_outside_the_toolkit_gives_the_reported_root(setup_mod, monkeypatch,
                                                                     tmp_path):
    """An nvcc on PATH that is a wrapper outside any toolkit, answering --dryrun like
    nvcc does (#$ TOP=<root>/bin/..): the root comes from its dry run."""
    tk = _fake_toolkit(tmp_path / "toolkits" / "cuda-99.9")
    wrapper_dir = tmp_path / "wrappers"
    _script(wrapper_dir / "nvcc", textwrap.dedent(f"""\
        case " $* " in
          *" --dryrun "*) echo "#\\$ _HERE_={tk}/bin" >&2; echo "#\\$ TOP={tk}/bin/.." >&2;;
          *) exec {tk}/bin/nvcc "$@";;
        esac"""))
    _put_on_path(monkeypatch, wrapper_dir)
    monkeypatch.setattr(setup_mod, "FALLBACK_CUDA_ROOTS", ())
    assert setup_mod._toolkit_root_from_nvcc(str(wrapper_dir / "nvcc")) == os.path.realpath(tk)
    assert setup_mod.find_cuda_home() == os.path.realpath(tk)


@needs_real_cuda
def test_exec_wrapper_around_real_nvcc_gives_the_real_toolkit(setup_mod, monkeypatch,
                                                             tmp_path):
    """A wrapper script that execs the real nvcc (like /usr/local/bin/nvcc on some
    machines): the real toolkit root, found without the fallback locations."""
    wrapper_dir = tmp_path / "wrappers"
    _script(wrapper_dir / "nvcc", f'exec {REAL_CUDA}/bin/nvcc "$@"')
    _put_on_path(monkeypatch, wrapper_dir)
    monkeypatch.setattr(setup_mod, "FALLBACK_CUDA_ROOTS", ())
    want = os.path.realpath(REAL_CUDA)
    assert setup_mod._toolkit_root_from_nvcc(str(wrapper_dir / "nvcc")) == want
    assert setup_mod.find_cuda_home() == want


def test_cuda_home_that_is_not_a_toolkit_is_ignored(setup_mod, monkeypatch, tmp_path,
                                                    capsys):
    bogus = tmp_path / "not_cuda"
    (bogus / "bin").mkdir(parents=True)  # a bin/ but no nvcc, no headers
    tk = _fake_toolkit(tmp_path / "cuda-99.9")
    monkeypatch.setenv("CUDA_HOME", str(bogus))
    monkeypatch.setenv("CUDA_PATH", str(tk))
    monkeypatch.setattr(setup_mod, "FALLBACK_CUDA_ROOTS", ())
    assert setup_mod.find_cuda_home() == os.path.realpath(tk)
    err = capsys.readouterr().err
    assert f"ignoring CUDA_HOME={bogus}" in err
    # With nothing else findable the bogus root is still not used.
    monkeypatch.delenv("CUDA_PATH")
    assert setup_mod.find_cuda_home() is None


def test_valid_cuda_home_wins(setup_mod, monkeypatch, tmp_path):
    tk = _fake_toolkit(tmp_path / "cuda-99.9")
    monkeypatch.setenv("CUDA_HOME", str(tk))
    assert setup_mod.find_cuda_home() == os.path.realpath(tk)


def test_build_cuda_1_without_a_toolkit_is_an_error(setup_mod, monkeypatch):
    monkeypatch.setattr(setup_mod, "FALLBACK_CUDA_ROOTS", ())
    monkeypatch.setenv("CROSSLAYER_BUILD_CUDA", "1")
    assert setup_mod.find_cuda_home() is None
    with pytest.raises(SystemExit) as ei:
        setup_mod.cuda_extension_or_reason()
    msg = str(ei.value.code)
    assert "CROSSLAYER_BUILD_CUDA=1" in msg and "no CUDA toolkit found" in msg
    with pytest.raises(SystemExit):
        setup_mod.main()
    assert setup_mod.setup_calls == []
    assert not os.path.exists(setup_mod.BUILD_INFO_PATH)


def pure_python_setup(calls) -> bool:
    """One setup() call with no ext_modules and only the build_py that packages the
    kernel headers for the JIT path."""
    return len(calls) == 1 and set(calls[0]) == {"cmdclass"} and list(calls[0]["cmdclass"]) == ["build_py"]


def test_unset_without_a_toolkit_builds_pure_python(setup_mod, monkeypatch, capsys):
    monkeypatch.setattr(setup_mod, "FALLBACK_CUDA_ROOTS", ())
    setup_mod.main()
    assert pure_python_setup(setup_mod.setup_calls)
    rec = Path(setup_mod.BUILD_INFO_PATH).read_text()
    assert "BUILT_CUDA = False" in rec and "no CUDA toolkit found" in rec
    assert "WITHOUT the CUDA extension" in capsys.readouterr().err


def test_build_cuda_0_is_pure_python(setup_mod, monkeypatch, tmp_path):
    # Even with a toolkit at hand.
    monkeypatch.setenv("CUDA_HOME", str(_fake_toolkit(tmp_path / "cuda-99.9")))
    monkeypatch.setenv("CROSSLAYER_BUILD_CUDA", "0")
    ext, reason, info = setup_mod.cuda_extension_or_reason()
    assert ext is None and reason == "CROSSLAYER_BUILD_CUDA=0"
    assert info["torch_version"] == torch.__version__
    setup_mod.main()
    assert pure_python_setup(setup_mod.setup_calls)
    ns = {}
    exec(Path(setup_mod.BUILD_INFO_PATH).read_text(), ns)
    assert ns["BUILT_CUDA"] is False and ns["SKIP_REASON"] == "CROSSLAYER_BUILD_CUDA=0"
    assert ns["TORCH_VERSION"] == torch.__version__


def test_build_cuda_other_values_are_rejected(setup_mod, monkeypatch):
    monkeypatch.setenv("CROSSLAYER_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="must be 0 or 1"):
        setup_mod.cuda_extension_or_reason()


@needs_real_cuda
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build")
def test_build_cuda_1_with_the_real_toolkit_configures_the_extension(setup_mod, monkeypatch):
    """Configuration only (nothing compiles): the extension, the toolkit it found and
    the architectures, when /usr/local/cuda matches torch's CUDA major version."""
    monkeypatch.setenv("CUDA_HOME", REAL_CUDA)
    monkeypatch.setenv("CROSSLAYER_BUILD_CUDA", "1")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    tk = setup_mod.nvcc_version(REAL_CUDA)
    if tk.split(".")[0] != torch.version.cuda.split(".")[0]:
        with pytest.raises(SystemExit, match="does not match torch's CUDA"):
            setup_mod.cuda_extension_or_reason()
        return
    ext, cmdclass, info = setup_mod.cuda_extension_or_reason()
    assert len(ext) == 1 and ext[0].name == "crosslayer._C"
    assert "build_ext" in cmdclass
    assert info["cuda_home"] == os.path.realpath(REAL_CUDA)
    assert info["cuda_archs"] == "8.0;9.0" and info["nvcc_version"] == tk


# ------------------------------------------------------------ info's GPU line (faked GPU)

@pytest.mark.parametrize("built,archs,want", [
    (True, ["8.0", "9.0"], "the build covers it"),
    (True, ["8.0+PTX"], "NOT covered by the build's architectures"),
    (False, [], "no extension"),
    # Disabled extension with a build record that lists the GPU's arch: not "covered".
    (False, ["9.0"], "no extension"),
])
def test_info_gpu_line(monkeypatch, built, archs, want):
    from crosslayer import info
    rec = {"torch_version": torch.__version__, "torch_cuda": torch.version.cuda,
           "built_cuda": built, "archs": archs, "built_torch_version": torch.__version__,
           "nvcc_version": "13.0", "cuda_home": "/usr/local/cuda",
           "skip_reason": "" if built else "CROSSLAYER_BUILD_CUDA=0",
           "extension_disabled": False}
    monkeypatch.setattr(info, "build_info", lambda: rec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    out = info.report()
    gpu = next(l for l in out.splitlines() if l.startswith("GPU "))
    assert "NVIDIA H100 80GB HBM3 (sm 9.0)" in gpu and want in gpu, gpu
    assert "runs now         on NVIDIA H100 80GB HBM3:" in out and "on a GPU " not in out
    if built:
        assert f"for sm {', '.join(archs)}" in out


def test_extension_limits_match_the_contracts():
    """One definition of the shape limits (csrc/common/limits.h), exported by _C, equal
    to crosslayer.contracts' (which the oracle and the validators use)."""
    from crosslayer import contracts
    from crosslayer._extension import _C

    if _C is None:
        pytest.skip("crosslayer._C is not built")
    assert (_C.MAX_STREAMS, _C.MAX_SLOTS) == (contracts.MAX_STREAMS, contracts.MAX_SLOTS)


@pytest.mark.cuemu
def test_emulated_extension_limits_match_the_contracts(cuemu):
    from crosslayer import contracts

    assert (cuemu.MAX_STREAMS, cuemu.MAX_SLOTS) == (contracts.MAX_STREAMS, contracts.MAX_SLOTS)
