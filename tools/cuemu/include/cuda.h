// cuemu stand-in for <cuda.h>: everything lives in cuemu.h.
#pragma once
#include "cuemu.h"
