# csrc/build_flags.json as CMake lists: the one flag list of crosslayer's CUDA code (see
# its "about"), read here as by setup.py, tools/nvcc_check.sh, the emulator and NVRTC.
#   CROSSLAYER_DEFINES            defines every compiler of the kernels gets
#   CROSSLAYER_NVCC_COMMON        what nvcc needs for the kernel headers in any build
#   CROSSLAYER_NVCC_FLAGS         nvcc's flags for the extension, release or debug
#                                 (CROSSLAYER_DEBUG) and ptxas's report
#                                 (CROSSLAYER_PTXAS_VERBOSE), as setup.py's
#   CROSSLAYER_CXX_FLAGS          the host compiler's
#   CROSSLAYER_ARCHS_WITHOUT_GPU  TORCH_CUDA_ARCH_LIST's default without a GPU
file(READ "${CMAKE_CURRENT_LIST_DIR}/../csrc/build_flags.json" _crosslayer_flags_json)

function(_crosslayer_flag_list out key)
  string(JSON count LENGTH "${_crosslayer_flags_json}" ${key})
  set(items "")
  if(count GREATER 0)
    math(EXPR last "${count} - 1")
    foreach(i RANGE ${last})
      string(JSON item GET "${_crosslayer_flags_json}" ${key} ${i})
      list(APPEND items "${item}")
    endforeach()
  endif()
  set(${out} "${items}" PARENT_SCOPE)
endfunction()

_crosslayer_flag_list(CROSSLAYER_DEFINES defines)
_crosslayer_flag_list(CROSSLAYER_NVCC_COMMON nvcc)
if(CROSSLAYER_DEBUG)
  _crosslayer_flag_list(_crosslayer_nvcc_mode nvcc_debug)
  _crosslayer_flag_list(CROSSLAYER_CXX_FLAGS cxx_debug)
else()
  _crosslayer_flag_list(_crosslayer_nvcc_mode nvcc_release)
  _crosslayer_flag_list(CROSSLAYER_CXX_FLAGS cxx_release)
endif()
set(CROSSLAYER_NVCC_FLAGS ${_crosslayer_nvcc_mode} ${CROSSLAYER_NVCC_COMMON} ${CROSSLAYER_DEFINES})
if(CROSSLAYER_PTXAS_VERBOSE)
  _crosslayer_flag_list(_crosslayer_ptxas ptxas_verbose)
  list(APPEND CROSSLAYER_NVCC_FLAGS ${_crosslayer_ptxas})
endif()
string(JSON CROSSLAYER_ARCHS_WITHOUT_GPU GET "${_crosslayer_flags_json}" archs_without_gpu)
