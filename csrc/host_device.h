// LOWCOST_HD marks a function written once for host C++ and CUDA device code (the CPU kernels, the CUDA
// kernels and the host-emulated tests all call the same definitions, so they compute the same bits).
#pragma once

#if defined(__CUDACC__)
#define LOWCOST_HD __host__ __device__ __forceinline__
#else
#define LOWCOST_HD inline
#endif
