"""crosslayer._nvrtc, the JIT path's compiler: the kernel headers compile through CuPy's
NVRTC binding (no nvcc, no GPU), one program per header; the disk cache; NVRTC's log on
an error; and the one flag list (csrc/build_flags.json) that setup.py, CMake and NVRTC
read. The full instantiation set, both architectures, is `tools/nvrtc_check.py` (CI runs
it after the build)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy (pip install cupy-cuda13x)")

from crosslayer import _nvrtc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nvrtc_check  # noqa: E402

FLAGS = json.loads((ROOT / "csrc" / "build_flags.json").read_text())
HC_POST_BF16 = "crosslayer::hc_post_fwd_kernel<__nv_bfloat16, 8, 4>"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSLAYER_JIT_CACHE", str(tmp_path / "jit"))
    return tmp_path / "jit"


@pytest.mark.cuemu
def test_every_kernel_template_compiles(cuemu):
    """One instantiation of every kernel template the launchers instantiate (read from
    the emulator's module: the same launchers), each header one NVRTC program, sm_90:
    every kernel header is NVRTC-clean."""
    per_header = nvrtc_check.instantiations(cuemu.__file__)
    assert set(per_header) == {h for h in nvrtc_check.kernel_headers().values()}
    for header, names in per_header.items():
        first = {}
        for name in names:
            first.setdefault(name.split("<", 1)[0], name)
        compiled = _nvrtc.compile_kernels(header, list(first.values()), "sm_90", use_cache=False)
        assert set(compiled.lowered) == set(first.values()) and compiled.cubin[:4] == b"\x7fELF", header
        assert all(m.startswith("_ZN10crosslayer") for m in compiled.lowered.values())


def test_cache_hits_and_keys(cache):
    first = _nvrtc.compile_kernels("kernels/hc_post.cuh", [HC_POST_BF16], "sm_90")
    assert not first.cached and first.seconds > 0
    again = _nvrtc.compile_kernels("kernels/hc_post.cuh", [HC_POST_BF16], "sm_90")
    assert again.cached and again.cubin == first.cubin and again.lowered == first.lowered
    assert len(list(cache.glob("*.cubin"))) == 1
    other = _nvrtc.compile_kernels("kernels/hc_post.cuh", [HC_POST_BF16], "sm_80")
    assert not other.cached and other.cubin != first.cubin
    assert _nvrtc.cache_key("kernels/hc_post.cuh", [HC_POST_BF16], "sm_90") != _nvrtc.cache_key(
        "kernels/hc_post.cuh", [HC_POST_BF16, "crosslayer::hc_post_fwd_kernel<float, 4, 4>"], "sm_90")


def test_a_damaged_cache_entry_is_compiled_again(cache):
    _nvrtc.compile_kernels("kernels/hc_post.cuh", [HC_POST_BF16], "sm_90")
    (json_file,) = cache.glob("*.json")
    json_file.write_text("{not json")
    again = _nvrtc.compile_kernels("kernels/hc_post.cuh", [HC_POST_BF16], "sm_90")
    assert not again.cached and HC_POST_BF16 in json.loads(json_file.read_text())


def test_a_compile_error_carries_nvrtc_log(cache):
    with pytest.raises(RuntimeError, match=r"(?s)NVRTC could not compile kernels/hc_post.cuh for sm_90.*error"):
        _nvrtc.compile_kernels("kernels/hc_post.cuh", ["crosslayer::hc_post_fwd_kernel<int, 8, 4, 1>"], "sm_90")
    with pytest.raises(ValueError, match="no kernel names"):
        _nvrtc.compile_kernels("kernels/hc_post.cuh", [], "sm_90")


def test_options_are_build_flags():
    opts = _nvrtc.options("sm_80")
    assert opts[0] == "-arch=sm_80"
    assert opts[1:1 + len(FLAGS["nvrtc"]) + len(FLAGS["defines"])] == FLAGS["nvrtc"] + FLAGS["defines"]
    assert f"-I{ROOT / 'csrc'}" in opts


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("crosslayer_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_reads_the_flag_list():
    """setup.py's flags are build_flags.json's."""
    setup = _setup_module()
    assert setup.FLAGS == FLAGS and setup.DEFAULT_ARCHS_NO_GPU == FLAGS["archs_without_gpu"]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
@pytest.mark.parametrize("debug", ["OFF", "ON"])
def test_cmake_reads_the_flag_list(tmp_path, debug):
    script = tmp_path / "flags.cmake"
    script.write_text(f'set(CROSSLAYER_DEBUG {debug})\nset(CROSSLAYER_PTXAS_VERBOSE ON)\n'
                      f'include("{ROOT / "cmake" / "CrosslayerFlags.cmake"}")\n'
                      'message(STATUS "NVCC=${CROSSLAYER_NVCC_FLAGS}")\nmessage(STATUS "CXX=${CROSSLAYER_CXX_FLAGS}")\n'
                      'message(STATUS "ARCHS=${CROSSLAYER_ARCHS_WITHOUT_GPU}")\n')
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True).stdout
    got = dict(line.removeprefix("-- ").split("=", 1) for line in out.splitlines() if "=" in line)
    mode = "debug" if debug == "ON" else "release"
    want_nvcc = FLAGS[f"nvcc_{mode}"] + FLAGS["nvcc"] + FLAGS["defines"] + FLAGS["ptxas_verbose"]
    assert got["NVCC"].split(";") == want_nvcc
    assert got["CXX"].split(";") == FLAGS[f"cxx_{mode}"]
    assert got["ARCHS"] == FLAGS["archs_without_gpu"]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_one_kernel_source_list(tmp_path):
    """setup.py (what a wheel carries), CMake (what crosslayer::kernels installs) and
    crosslayer._nvrtc (what the JIT cache hashes) read the same list of kernel sources."""
    script = tmp_path / "sources.cmake"
    script.write_text(f'include("{ROOT / "cmake" / "CrosslayerFlags.cmake"}")\n'
                      'message(STATUS "SOURCES=${CROSSLAYER_KERNEL_SOURCES}")\n')
    out = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True).stdout
    cmake = out.split("SOURCES=", 1)[1].strip().split(";")
    nvrtc = _nvrtc.kernel_sources(str(ROOT / "csrc"))
    assert cmake == nvrtc and "kernels/phases/slot_tile.cuh" in nvrtc and "common/limits.h" in nvrtc
    assert _setup_module().kernel_sources() == sorted(nvrtc + ["build_flags.json"])


def test_nvcc_check_reads_the_flag_list():
    text = (ROOT / "tools" / "nvcc_check.sh").read_text()
    assert "build_flags.json" in text and "-O3" not in text and "__CUDA_NO_HALF" not in text


def test_name_expressions_from_symbols():
    assert nvrtc_check.name_expression("void crosslayer::k<float, 4, (crosslayer::Mode)1>(crosslayer::P)") == \
        "crosslayer::k<float, 4, (crosslayer::Mode)1>"
    assert nvrtc_check.name_expression("void crosslayer::k<float>(crosslayer::P) [clone .cold]") is None
    assert nvrtc_check.name_expression("crosslayer::launch(at::Tensor const&)") is None
    assert nvrtc_check.kernel_headers()["mudd_weights_fwd_proj_kernel"] == os.path.join("kernels", "mudd_weights.cuh")


def test_packaged_sources_close_over_the_kernel_includes():
    """setup.py's kernel_sources() (what a wheel carries for the JIT path) holds every
    file the kernel headers include, transitively."""
    import re

    sources = set(_setup_module().kernel_sources())
    todo = [s for s in sources if s.startswith("kernels")]
    seen = set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        assert rel in sources, f"{rel} is included by the kernels but not packaged"
        todo += re.findall(r'#include "([^"]+)"', (ROOT / "csrc" / rel).read_text())


def test_a_wheel_without_compiled_code_compiles_through_nvrtc(tmp_path):
    """CROSSLAYER_BUILD_CUDA=0 pip wheel: the wheel carries crosslayer/csrc, and the
    installed package's NVRTC compiler finds and compiles from it."""
    env = dict(os.environ, CROSSLAYER_BUILD_CUDA="0")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(ROOT),
                    "-w", str(tmp_path / "wheel")], check=True, env=env, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "wheel").glob("crosslayer-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    code = ("import crosslayer._nvrtc as n; assert n.csrc_dir().startswith(%r), n.csrc_dir(); "
            "c = n.compile_kernels('kernels/stream_mix.cuh', ['crosslayer::stream_mix_fwd_kernel<float, 4, 4>'], "
            "'sm_80', use_cache=False); print(len(c.cubin))") % str(tmp_path / "site")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert int(out.stdout.split()[-1]) > 1000
