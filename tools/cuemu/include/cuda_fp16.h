// cuemu stand-in for <cuda_fp16.h>: everything lives in cuemu.h.
#pragma once
#include "cuemu.h"
