# csrc/build_flags.json as CMake lists: the one flag list of crosslayer's CUDA code (see
# its "about"), read here as by setup.py, tools/nvcc_check.sh, the emulator and NVRTC.
#   CROSSLAYER_DEFINES            defines every compiler of the kernels gets
#   CROSSLAYER_NVCC_COMMON        what nvcc needs for the kernel headers in any build
#   CROSSLAYER_NVCC_FLAGS         nvcc's flags for the extension, release or debug
#                                 (CROSSLAYER_DEBUG) and ptxas's report
#                                 (CROSSLAYER_PTXAS_VERBOSE), as setup.py's
#   CROSSLAYER_CXX_FLAGS          the host compiler's
#   CROSSLAYER_ARCHS_WITHOUT_GPU  TORCH_CUDA_ARCH_LIST's default without a GPU
#   CROSSLAYER_KERNEL_SOURCES     the torch-free kernel sources, relative to csrc/ (its
#                                 "kernel_sources" globs: what crosslayer::kernels installs)
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

_crosslayer_flag_list(_crosslayer_source_globs kernel_sources)
set(CROSSLAYER_KERNEL_SOURCES "")
foreach(pattern IN LISTS _crosslayer_source_globs)
  # "dir/**/*.cuh": *.cuh at any depth under dir (GLOB_RECURSE); else one directory (GLOB).
  if(pattern MATCHES "^(.*)\\*\\*/(.*)$")
    file(GLOB_RECURSE _crosslayer_found RELATIVE "${CMAKE_CURRENT_LIST_DIR}/../csrc"
         "${CMAKE_CURRENT_LIST_DIR}/../csrc/${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
  else()
    file(GLOB _crosslayer_found RELATIVE "${CMAKE_CURRENT_LIST_DIR}/../csrc" "${CMAKE_CURRENT_LIST_DIR}/../csrc/${pattern}")
  endif()
  list(APPEND CROSSLAYER_KERNEL_SOURCES ${_crosslayer_found})
endforeach()
list(REMOVE_DUPLICATES CROSSLAYER_KERNEL_SOURCES)
list(SORT CROSSLAYER_KERNEL_SOURCES)
