// Minimal host-side stand-ins for the CUDA built-ins used by the simple kernels in kernels/, so
// that their unchanged source compiles with g++ and runs on the CPU in tests.
//
// A "launch" runs every (block, thread) pair in order, one after the other. That is only valid
// for kernels that use neither shared memory nor __syncthreads and whose threads write disjoint
// outputs: exactly the contract of kernels/local_relation.cu.
#pragma once

#include <math.h>  // expf, logf, fabsf, fmaxf in the global namespace, as on the device

#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct lr_host_dim3 {
    unsigned int x, y, z;
};

static lr_host_dim3 blockIdx = {0, 0, 0};
static lr_host_dim3 threadIdx = {0, 0, 0};
static lr_host_dim3 blockDim = {1, 1, 1};
static lr_host_dim3 gridDim = {1, 1, 1};

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

// Run `body()` once for every thread of a 1-D grid of `grid` blocks of `block` threads.
template <typename Body>
void lr_host_launch(unsigned int grid, unsigned int block, Body body) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned int bx = 0; bx < grid; ++bx) {
        for (unsigned int tx = 0; tx < block; ++tx) {
            blockIdx = {bx, 0, 0};
            threadIdx = {tx, 0, 0};
            body();
        }
    }
}
