// cuemu stand-in for <cuda_runtime_api.h>: everything lives in cuemu.h.
#pragma once
#include "cuemu.h"
