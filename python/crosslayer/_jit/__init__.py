"""crosslayer's no-build path: the kernels compiled at first use through NVRTC (CuPy's
binding, crosslayer._nvrtc) and launched from Python (runtime), with launchers that
mirror the C++ ones, one module per op (hc_post mirrors csrc/hc_post.cu, ...), gathered
in launchers. It covers every op and runs where crosslayer._C is not built for the GPU
and CuPy is importable; crosslayer._extension chooses (CROSSLAYER_BACKEND forces one)."""
