// Shared helpers of the local relation kernels (DESIGN.md §1).
//
// Header-only and free of system includes so that NVRTC compiles it without a CUDA toolkit and
// g++ compiles it on the CPU through tests/host_shim/cuda_host_shim.h (which defines
// __device__, __forceinline__, __float_as_uint, ...). fp16 and bf16 tensors are handled as raw
// 16-bit patterns (no cuda_fp16.h / cuda_bf16.h): the tag types below carry the bits and the
// conversions are plain bit manipulation, round-to-nearest-even on the way back. All arithmetic
// is done in fp32.
#pragma once

// Storage tags for the 16-bit dtypes: a struct so that the kernel templates tell them apart.
struct lr_half {
    unsigned short bits;
};
struct lr_bf16 {
    unsigned short bits;
};

// ---- fp16 <-> fp32 --------------------------------------------------------------------------

__device__ __forceinline__ float lr_half_bits_to_float(unsigned short h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exp = (h >> 10) & 0x1fu;
    unsigned int man = h & 0x3ffu;
    unsigned int out;
    if (exp == 0x1fu) {  // inf / nan
        out = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {  // normal
        out = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {  // signed zero
        out = sign;
    } else {  // subnormal: normalise the mantissa
        unsigned int e = 113u;
        while ((man & 0x400u) == 0) {
            man <<= 1;
            --e;
        }
        out = sign | (e << 23) | ((man & 0x3ffu) << 13);
    }
    return __uint_as_float(out);
}

__device__ __forceinline__ unsigned short lr_float_to_half_bits(float f) {
    unsigned int u = __float_as_uint(f);
    unsigned int sign = (u >> 16) & 0x8000u;
    unsigned int abs = u & 0x7fffffffu;
    if (abs >= 0x7f800000u) {  // inf / nan (keep nan quiet and non-zero)
        return (unsigned short)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    }
    if (abs >= 0x477ff000u) {  // rounds to a value beyond 65504: overflow to inf
        return (unsigned short)(sign | 0x7c00u);
    }
    if (abs >= 0x38800000u) {  // normal half (|f| >= 2^-14)
        unsigned int mant_odd = (abs >> 13) & 1u;
        abs += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
        return (unsigned short)(sign | (abs >> 13));
    }
    if (abs < 0x33000001u) {  // below half the smallest subnormal: signed zero
        return (unsigned short)sign;
    }
    // subnormal half: shift the full mantissa into place with round-to-nearest-even
    unsigned int exp = abs >> 23;
    unsigned int man = (abs & 0x7fffffu) | 0x800000u;
    unsigned int shift = 126u - exp;  // in [14, 24]
    unsigned int result = man >> shift;
    unsigned int rest = man & ((1u << shift) - 1u);
    unsigned int halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (result & 1u))) ++result;
    return (unsigned short)(sign | result);
}

// ---- bf16 <-> fp32 --------------------------------------------------------------------------

__device__ __forceinline__ float lr_bf16_bits_to_float(unsigned short h) {
    return __uint_as_float((unsigned int)h << 16);
}

__device__ __forceinline__ unsigned short lr_float_to_bf16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // nan: keep it a quiet nan
        return (unsigned short)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (unsigned short)(u >> 16);
}

// ---- typed loads and stores -------------------------------------------------------------------

__device__ __forceinline__ float lr_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float lr_load(const lr_half* p, long long i) {
    return lr_half_bits_to_float(p[i].bits);
}
__device__ __forceinline__ float lr_load(const lr_bf16* p, long long i) {
    return lr_bf16_bits_to_float(p[i].bits);
}

__device__ __forceinline__ void lr_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void lr_store(lr_half* p, long long i, float v) {
    p[i].bits = lr_float_to_half_bits(v);
}
__device__ __forceinline__ void lr_store(lr_bf16* p, long long i, float v) {
    p[i].bits = lr_float_to_bf16_bits(v);
}

// ---- appearance composability ---------------------------------------------------------------

// Runtime composability codes (robustlr.ops.cupy_backend.COMPOSABILITY_CODES).
#define LR_SQDIFF 0
#define LR_ABSDIFF 1
#define LR_MUL 2

__device__ __forceinline__ float lr_phi(int comp, float q, float k) {
    if (comp == LR_SQDIFF) {
        float d = q - k;
        return -d * d;
    }
    if (comp == LR_ABSDIFF) return -fabsf(q - k);
    return q * k;
}

__device__ __forceinline__ float lr_sign(float v) {
    return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
}

// d phi / d q (d phi / d k is the same with the roles of q and k swapped).
__device__ __forceinline__ float lr_dphi_dq(int comp, float q, float k) {
    if (comp == LR_SQDIFF) return -2.0f * (q - k);
    if (comp == LR_ABSDIFF) return -lr_sign(q - k);
    return k;
}

__device__ __forceinline__ float lr_dphi_dk(int comp, float q, float k) {
    if (comp == LR_SQDIFF) return 2.0f * (q - k);
    if (comp == LR_ABSDIFF) return lr_sign(q - k);
    return q;
}

// ---- shared memory ----------------------------------------------------------------------------

// A static shared array. The CUDA execution emulator of the tests (tests/host_shim) defines its
// own, which poisons the array at the start of every block and keeps concurrent blocks apart.
#ifndef LR_SHARED
#define LR_SHARED(T, name, count) __shared__ T name[count]
#endif

// ---- tiles --------------------------------------------------------------------------------

// Output tile of one block: LR_TILE_W x LR_TILE_H threads, one output (forward, backward query)
// or one input position (backward input) each. robustlr.ops.cupy_backend.TILE mirrors these.
#define LR_TILE_W 16
#define LR_TILE_H 8
#define LR_THREADS (LR_TILE_W * LR_TILE_H)

// floor(a / b) for b > 0 and any sign of a.
__device__ __forceinline__ long long lr_floor_div(long long a, long long b) {
    const long long q = a / b;
    return (q * b > a) ? q - 1 : q;
}

// Shared tiles read at a stride (forward, backward query) are stored phase by phase: column c of
// a row sits at (c % STRIDE) * lr_phase_cols + c / STRIDE, so the 16 threads of a tile row, which
// read columns tx * STRIDE + b, read 16 consecutive words. A warp covers two tile rows, STRIDE
// input rows apart; the row pitch is padded so that STRIDE * pitch is 16 modulo 32 words, which
// puts the two rows' 16 words in 32 distinct banks: every window read is one shared-memory
// transaction. robustlr.ops.cupy_backend.phase_cols / shared_pitch mirror these.
template <int COLS, int STRIDE>
__host__ __device__ constexpr int lr_phase_cols() {
    return (COLS + STRIDE - 1) / STRIDE;
}

template <int COLS, int STRIDE>
__host__ __device__ constexpr int lr_pitch() {
    // the smallest pitch >= STRIDE * lr_phase_cols with STRIDE * pitch = 16 (mod 32); none for
    // strides that are multiples of 32 (then unpadded)
    int p = STRIDE * lr_phase_cols<COLS, STRIDE>();
    for (int extra = 0; extra < 32; ++extra) {
        if ((STRIDE * (p + extra)) % 32 == 16) return p + extra;
    }
    return p;
}

// Position of column `col` in a phase-ordered row (see above).
template <int COLS, int STRIDE>
__host__ __device__ constexpr int lr_phase_col(int col) {
    return (col % STRIDE) * lr_phase_cols<COLS, STRIDE>() + col / STRIDE;
}

// Row pitch of the backward-input tiles (read at stride 1 by lanes that share words at larger
// strides): padded to 16 modulo 32 at stride 1, unpadded otherwise.
// robustlr.ops.cupy_backend.plain_pitch mirrors it.
template <int COLS, int STRIDE>
__host__ __device__ constexpr int lr_plain_pitch() {
    return STRIDE == 1 ? COLS + (48 - COLS % 32) % 32 : COLS;
}

// Channels of a group staged in shared memory at once (the window loops run over offsets
// outside and these channels inside): at most LR_MAX_CHUNK, as many as 48 KB of static shared
// memory hold next to FIXED floats, at least 1. robustlr.ops.cupy_backend.channel_chunk mirrors it.
#define LR_MAX_CHUNK 8
template <int FIXED, int PER>
__host__ __device__ constexpr int lr_chunk() {
    return (12288 - FIXED) / PER >= LR_MAX_CHUNK ? LR_MAX_CHUNK
           : (12288 - FIXED) / PER < 1          ? 1
                                                : (12288 - FIXED) / PER;
}

// Most global loads a thread of the tile loader keeps in flight (registers it holds for them).
#define LR_LOAD_BATCH 4

// Copy the ROWS x COLS window of a (H, W) plane whose top-left corner is (r0, c0) into shared
// memory as fp32, with zeros where the window leaves the plane; element (row, col) goes to
// row * PITCH + (PHASED ? lr_phase_col<COLS, STRIDE>(col) : col). All threads of the block take
// part (tid in [0, LR_THREADS)). Pipelined: the trip count is a constant, and each thread
// issues a batch of up to LR_LOAD_BATCH global loads before the first of their shared stores,
// so a warp waits for one memory latency per batch instead of one per element.
template <int ROWS, int COLS, int STRIDE, int PITCH, bool PHASED, typename T>
__device__ __forceinline__ void lr_load_rows(float* __restrict__ dst, const T* __restrict__ plane,
                                             long long r0, long long c0, long long H,
                                             long long W, int tid) {
    constexpr int N = ROWS * COLS;
    constexpr int TRIPS = (N + LR_THREADS - 1) / LR_THREADS;
    constexpr int BATCH = TRIPS < LR_LOAD_BATCH ? TRIPS : LR_LOAD_BATCH;
#pragma unroll 1
    for (int t0 = 0; t0 < TRIPS; t0 += BATCH) {
        float v[BATCH];
#pragma unroll
        for (int t = 0; t < BATCH; ++t) {
            const int e = tid + (t0 + t) * LR_THREADS;
            const long long r = r0 + e / COLS, c = c0 + e % COLS;
            v[t] = (e < N && r >= 0 && r < H && c >= 0 && c < W) ? lr_load(plane, r * W + c)
                                                                 : 0.0f;
        }
#pragma unroll
        for (int t = 0; t < BATCH; ++t) {
            const int e = tid + (t0 + t) * LR_THREADS;
            const int row = e / COLS, col = e % COLS;
            if (e < N) dst[row * PITCH + (PHASED ? lr_phase_col<COLS, STRIDE>(col) : col)] = v[t];
        }
    }
}

// A tile read at STRIDE by the window loops: phase order, row pitch lr_pitch.
template <int ROWS, int COLS, int STRIDE, typename T>
__device__ __forceinline__ void lr_load_phased(float* __restrict__ dst,
                                               const T* __restrict__ plane, long long r0,
                                               long long c0, long long H, long long W, int tid) {
    lr_load_rows<ROWS, COLS, STRIDE, lr_pitch<COLS, STRIDE>(), true>(dst, plane, r0, c0, H, W,
                                                                      tid);
}

// A tile in plain row order with row pitch PITCH.
template <int ROWS, int COLS, int PITCH, typename T>
__device__ __forceinline__ void lr_load_tile(float* __restrict__ dst, const T* __restrict__ plane,
                                             long long r0, long long c0, long long H, long long W,
                                             int tid) {
    lr_load_rows<ROWS, COLS, 1, PITCH, false>(dst, plane, r0, c0, H, W, tid);
}

// Copy the K * K prior logits of one group into shared memory: a strided loop, so every K works
// with any block size (K * K may exceed LR_THREADS: 169 at K = 13).
template <int KK>
__device__ __forceinline__ void lr_load_geo(float* __restrict__ dst, const float* __restrict__ src,
                                            int tid) {
    for (int e = tid; e < KK; e += LR_THREADS) dst[e] = src[e];
}
