"""What torch.utils.cpp_extension would give crosslayer._C (setup.py's build), printed as
`key=value` lines of "|"-separated lists for CMakeLists.txt: include and library directories,
the libraries a CUDA extension links, the defines and nvcc flags it adds (the libstdc++
ABI, COMMON_NVCC_FLAGS), the C++ standard its compiler commands use,
and torch's CUDA version. Run by CMake with the Python it found."""

import inspect
import sys
import warnings

import torch
import torch.utils.cpp_extension as ext


def cmake_list(values) -> str:
    """Items joined by "|" (CMakeLists.txt splits the lines on ";" first)."""
    return "|".join(str(v) for v in values)


def paths(fn) -> list:
    try:
        return fn(device_type="cuda")
    except TypeError:  # before torch 2.6: fn(cuda=True)
        return fn(cuda=True)


def main() -> int:
    warnings.simplefilter("ignore")
    if torch.version.cuda is None:
        print(f"torch {torch.__version__} is not a CUDA build", file=sys.stderr)
        return 1
    # The libstdc++ ABI torch was built with (cpp_extension adds it where it differs from
    # the compiler's default; stating it always is the same build).
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    std = "20" if "-std=c++20" in inspect.getsource(ext) else "17"
    print(f"TORCH_VERSION={torch.__version__}")
    print(f"TORCH_CUDA={torch.version.cuda}")
    print(f"TORCH_INCLUDE_DIRS={cmake_list(paths(ext.include_paths))}")
    print(f"TORCH_LIBRARY_DIRS={cmake_list(paths(ext.library_paths))}")
    print(f"TORCH_LIBRARIES={cmake_list(['c10', 'torch', 'torch_cpu', 'torch_python', 'c10_cuda', 'torch_cuda'])}")
    print(f"TORCH_ABI_FLAGS={cmake_list(abi)}")
    print(f"TORCH_NVCC_FLAGS={cmake_list(ext.COMMON_NVCC_FLAGS)}")
    print(f"TORCH_CXX_STANDARD={std}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
