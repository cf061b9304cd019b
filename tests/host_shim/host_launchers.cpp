// C entry points around the simple kernels of kernels/local_relation.cu for the CPU tests
// (tests/test_kernels_host.py). Built with:
//   g++ -O1 -std=c++17 -shared -fPIC -I tests/host_shim -I kernels host_launchers.cpp
// Each kernel is run through lr_host_launch (cuda_host_shim.h): blocks and threads in order.
#include "cuda_host_shim.h"

#include "local_relation.cu"

#define LR_SIZES long long B, long long C, long long H, long long W, long long G, long long m, \
                 long long Ho, long long Wo

#define LR_HOST_INSTANTIATE(TNAME, T, K, S)                                                    \
    extern "C" void lr_host_forward_##TNAME##_k##K##_s##S(                                     \
        unsigned int grid, unsigned int block, const void* x, const void* q, const void* k,    \
        const float* geo, void* y, float* lse, LR_SIZES, int comp) {                           \
        lr_host_launch(grid, block, [&] {                                                      \
            lr_forward<T, K, S>((const T*)x, (const T*)q, (const T*)k, geo, (T*)y, lse, B, C,  \
                                H, W, G, m, Ho, Wo, comp);                                     \
        });                                                                                    \
    }                                                                                          \
    extern "C" void lr_host_backward_query_##TNAME##_k##K##_s##S(                              \
        unsigned int grid, unsigned int block, const void* x, const void* q, const void* k,    \
        const float* geo, const float* lse, const void* gy, void* gq, float* dsum,             \
        float* geo_partial, LR_SIZES, long long nchunks, int comp) {                           \
        lr_host_launch(grid, block, [&] {                                                      \
            lr_backward_query<T, K, S>((const T*)x, (const T*)q, (const T*)k, geo, lse,        \
                                       (const T*)gy, (T*)gq, dsum, geo_partial, B, C, H, W, G, \
                                       m, Ho, Wo, nchunks, comp);                              \
        });                                                                                    \
    }                                                                                          \
    extern "C" void lr_host_backward_input_##TNAME##_k##K##_s##S(                              \
        unsigned int grid, unsigned int block, const void* x, const void* q, const void* k,    \
        const float* geo, const float* lse, const float* dsum, const void* gy, void* gx,       \
        void* gk, LR_SIZES, int comp) {                                                        \
        lr_host_launch(grid, block, [&] {                                                      \
            lr_backward_input<T, K, S>((const T*)x, (const T*)q, (const T*)k, geo, lse, dsum,  \
                                       (const T*)gy, (T*)gx, (T*)gk, B, C, H, W, G, m, Ho, Wo, \
                                       comp);                                                  \
        });                                                                                    \
    }

#define LR_HOST_ALL_STRIDES(K)        \
    LR_HOST_INSTANTIATE(f32, float, K, 1) \
    LR_HOST_INSTANTIATE(f32, float, K, 2) \
    LR_HOST_INSTANTIATE(f32, float, K, 3)

LR_HOST_ALL_STRIDES(3)
LR_HOST_ALL_STRIDES(5)
LR_HOST_ALL_STRIDES(7)
LR_HOST_ALL_STRIDES(9)

// The 16-bit storage paths, for one window size.
LR_HOST_INSTANTIATE(f16, lr_half, 3, 1)
LR_HOST_INSTANTIATE(f16, lr_half, 5, 2)
LR_HOST_INSTANTIATE(bf16, lr_bf16, 3, 1)
LR_HOST_INSTANTIATE(bf16, lr_bf16, 5, 2)

// The 16-bit conversion helpers of lr_common.cuh, elementwise.
extern "C" void lr_host_float_to_half(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = lr_float_to_half_bits(in[i]);
}
extern "C" void lr_host_half_to_float(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = lr_half_bits_to_float(in[i]);
}
extern "C" void lr_host_float_to_bf16(const float* in, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = lr_float_to_bf16_bits(in[i]);
}
extern "C" void lr_host_bf16_to_float(const unsigned short* in, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = lr_bf16_bits_to_float(in[i]);
}
