// cuemu stand-in for <cuda_runtime.h>: everything lives in cuemu.h.
#pragma once
#include "cuemu.h"
