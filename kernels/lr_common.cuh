// Shared helpers of the local relation kernels (DESIGN.md §1).
//
// Header-only and free of system includes so that NVRTC compiles it without a CUDA toolkit and
// g++ compiles it on the CPU through tests/host_shim/cuda_emulator.h (which defines
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

// On the GPU the 16-bit conversions are single instructions (cvt: exact from fp16, round to
// nearest even to fp16 / bf16, as the bit manipulation above); the CPU builds of the tests
// (no __CUDA_ARCH__) run the bit manipulation, which tests/test_kernels_host.py checks against
// torch for every pattern.
__device__ __forceinline__ float lr_half_to_float(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    return lr_half_bits_to_float(h);
#endif
}

__device__ __forceinline__ unsigned short lr_float_to_half(float f) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    return lr_float_to_half_bits(f);
#endif
}

__device__ __forceinline__ unsigned short lr_float_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    return lr_float_to_bf16_bits(f);
#endif
}

// Element i of a tensor in global memory (I: long long, or int where the offset is known to
// fit: then one IMAD.WIDE for the address). Global loads and stores by name (ld.global.nc,
// st.global), also through an address the compiler cannot trace to a kernel argument
// (lr_opaque), which it would otherwise access as generic memory.
template <typename V>
__device__ __forceinline__ V lr_global_load(const V* p) {
#ifdef __CUDA_ARCH__
    return __ldg(p);
#else
    return *p;
#endif
}
template <typename V>
__device__ __forceinline__ void lr_global_store(V* p, V v) {
#ifdef __CUDA_ARCH__
    __stwb(p, v);
#else
    *p = v;
#endif
}
template <typename I>
__device__ __forceinline__ float lr_load(const float* p, I i) {
    return lr_global_load(p + i);
}
template <typename I>
__device__ __forceinline__ float lr_load(const lr_half* p, I i) {
    return lr_half_to_float(lr_global_load(&p[i].bits));
}
template <typename I>
__device__ __forceinline__ float lr_load(const lr_bf16* p, I i) {
    return lr_bf16_bits_to_float(lr_global_load(&p[i].bits));
}
template <typename I>
__device__ __forceinline__ void lr_store(float* p, I i, float v) {
    lr_global_store(p + i, v);
}
template <typename I>
__device__ __forceinline__ void lr_store(lr_half* p, I i, float v) {
    lr_global_store(&p[i].bits, lr_float_to_half(v));
}
template <typename I>
__device__ __forceinline__ void lr_store(lr_bf16* p, I i, float v) {
    lr_global_store(&p[i].bits, lr_float_to_bf16(v));
}

// ---- exponentials ------------------------------------------------------------------------------

// The softmax runs in base 2: exp(l - c) = 2^(l * log2(e) - c * log2(e)), the logits formed in
// base 2 (lr_logit2), then one MUFU.EX2 on the GPU (ex2.approx.ftz: relative error below 2^-22
// over the whole range, where the accurate expf costs 11 instructions); exp2f on the CPU builds
// of the tests.
#define LR_LOG2E 1.4426950408889634f
#define LR_LN2 0.6931471805599453f

__device__ __forceinline__ float lr_exp2(float v) {
#ifdef __CUDA_ARCH__
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    return r;
#else
    return exp2f(v);
#endif
}

// log2(v) and 1 / v for the softmax sums (at least LR_SUM_FLOOR = 2^-80, normal): one MUFU.LG2
// or MUFU.RCP on the GPU (lg2.approx.ftz: absolute error below 2^-22; rcp.approx.ftz: 1 ulp),
// where the accurate logf costs 28 instructions and 1.0f / v a test and a call of its slow path.
__device__ __forceinline__ float lr_log2(float v) {
#ifdef __CUDA_ARCH__
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    return r;
#else
    return log2f(v);
#endif
}
__device__ __forceinline__ float lr_rcp(float v) {
#ifdef __CUDA_ARCH__
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    return r;
#else
    return 1.0f / v;
#endif
}

// ---- appearance composability ---------------------------------------------------------------

// Runtime composability codes (robustlr.ops.cupy_backend.COMPOSABILITY_CODES).
#define LR_SQDIFF 0
#define LR_ABSDIFF 1
#define LR_MUL 2

// The logits in base 2 (v12): l * log2(e) = phi2(q2, k) + geo * log2(e), with the query scaled
// once per output, q2 = q * lr_query_scale(comp), and the prior logits staged as geo2 = (geo -
// bound) * log2(e) (lr_stage_geo), so that the forward's weight 2^(l * log2(e) - bound *
// log2(e)) is one MUFU.EX2 of lr_logit2: sqdiff's phi2 is -d^2 with d = q2 - k * sqrt(log2(e))
// (one FFMA, as q - k was one FADD), absdiff's -|q2 - k * log2(e)|, mul's q2 * k. Every kernel
// forms its logits this way, so the backward's recomputed weights hold the forward's bits (up to
// one rounding per output, in its shift).
#define LR_SQRT_LOG2E 1.2011224087864498f

__device__ __forceinline__ float lr_query_scale(int comp) {
    return comp == LR_SQDIFF ? LR_SQRT_LOG2E : LR_LOG2E;
}

// d of sqdiff and absdiff: the scaled q - k
__device__ __forceinline__ float lr_scaled_diff(int comp, float q2, float k) {
    return fmaf(k, -lr_query_scale(comp), q2);
}

// l * log2(e) - bound * log2(e) from the scaled query, the key and the staged prior logit geo2:
// fused explicitly, so that every kernel (and the CPU builds of the tests) rounds it alike
__device__ __forceinline__ float lr_logit2(int comp, float q2, float k, float geo2) {
    if (comp == LR_SQDIFF) {
        const float d = lr_scaled_diff(comp, q2, k);
        return fmaf(-d, d, geo2);
    }
    if (comp == LR_ABSDIFF) return geo2 - fabsf(lr_scaled_diff(comp, q2, k));
    return fmaf(q2, k, geo2);
}

__device__ __forceinline__ float lr_sign(float v) {
    return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
}

// d phi / d q and d phi / d k (natural units) are lr_query_grad_scale(comp) x lr_dphi2_dq and
// lr_key_grad_scale(comp) x lr_dphi2_dk: the constant applied once per output (grad q) or per
// input (grad k), after the sums.
__device__ __forceinline__ float lr_dphi2_dq(int comp, float q2, float k) {
    if (comp == LR_SQDIFF) return lr_scaled_diff(comp, q2, k);  // -2 (q - k) = -2 / sqrt(log2 e) d
    if (comp == LR_ABSDIFF) return -lr_sign(lr_scaled_diff(comp, q2, k));
    return k;
}

__device__ __forceinline__ float lr_dphi2_dk(int comp, float q2, float k) {
    if (comp == LR_SQDIFF) return -lr_scaled_diff(comp, q2, k);
    if (comp == LR_ABSDIFF) return lr_sign(lr_scaled_diff(comp, q2, k));
    return q2;  // q = q2 / log2(e)
}

__device__ __forceinline__ float lr_query_grad_scale(int comp) {
    return comp == LR_SQDIFF ? -2.0f / LR_SQRT_LOG2E : 1.0f;
}

__device__ __forceinline__ float lr_key_grad_scale(int comp) {
    return comp == LR_SQDIFF ? -2.0f / LR_SQRT_LOG2E : (comp == LR_MUL ? LR_LN2 : 1.0f);
}

// ---- shared memory ----------------------------------------------------------------------------

// A static shared array; LR_SHARED_VECTORS one read by vector loads (lr_read_vec), 16-byte
// aligned, declared first in its kernel so that ptxas pads no other array. The CUDA execution
// emulator of the tests (tests/host_shim) defines its own (heap buffers, 16-byte aligned), which
// poisons the array at the start of every block and keeps concurrent blocks apart.
#ifndef LR_SHARED
#define LR_SHARED(T, name, count) __shared__ T name[count]
#define LR_SHARED_VECTORS(T, name, count) __shared__ alignas(16) T name[count]
#define LR_DYNAMIC_SHARED(T, name) extern __shared__ __align__(16) T name[]
#endif

// ---- tiles --------------------------------------------------------------------------------

// Block of every kernel: LR_TILE_W x LR_TILE_H threads, each owning a vertical strip of
// positions (below). robustlr.ops.cupy_backend.TILE mirrors these.
#define LR_TILE_W 16
#define LR_TILE_H 8
#define LR_THREADS (LR_TILE_W * LR_TILE_H)
// Resident blocks per SM every kernel is compiled for (__launch_bounds__): ptxas keeps each
// thread within 65,536 / (LR_MIN_BLOCKS * LR_THREADS) = 128 registers.
#define LR_MIN_BLOCKS 4

// floor(a / b) for b > 0 and any sign of a.
__device__ __forceinline__ long long lr_floor_div(long long a, long long b) {
    const long long q = a / b;
    return (q * b > a) ? q - 1 : q;
}

// Tile number `tile` of a kernel's tile list, ((image * G + g) * tiles_h + th) * tiles_w + tw,
// taken apart by three quotients, each with its remainder (the same division: 5 divisions
// before v13). In 32 bits, unsigned: a launch's list holds fewer than 2^31 tiles
// (cupy_backend.offsets_fit), so a grid-stride step past its end does not wrap either (64-bit
// divisions before v14: each a test and a 32-bit path, and a call where a value passes 2^32).
struct lr_tile_place {
    long long image, g, th, tw;
};
__device__ __forceinline__ lr_tile_place lr_tile_of(unsigned tile, unsigned tiles_w,
                                                    unsigned tiles_h, unsigned G) {
    const unsigned rows = tile / tiles_w;    // (image * G + g) * tiles_h + th
    const unsigned planes = rows / tiles_h;  // image * G + g
    const unsigned image = planes / G;
    return {image, planes % G, rows % tiles_h, tile % tiles_w};
}

// lr_floor_div in 32 bits (its own name: an int overload would make mixed calls ambiguous).
__device__ __forceinline__ int lr_floor_div_int(int a, int b) {
    const int q = a / b;
    return (q * b > a) ? q - 1 : q;
}

// Register blocking: every thread computes a vertical strip of R adjacent positions (outputs
// in lr_forward / lr_backward_query, inputs in lr_backward_input), so a tile is LR_TILE_W
// positions wide and LR_TILE_H * R tall, and each window word a thread reads from shared
// memory serves up to R of its positions instead of one.
//
// Shared tiles read at a stride (forward, backward query) are stored phase by phase: column c of
// a row sits at (c % STRIDE) * lr_phase_cols + c / STRIDE, so the 16 threads of a tile row, which
// read columns tx * STRIDE + b, read 16 consecutive words. A warp covers two tile rows of
// threads, whose reads at one instruction lie STEP = R * STRIDE input rows apart; the row pitch
// is padded so that STEP * pitch is 16 modulo 32 words, which puts the two rows' 16 words in 32
// distinct banks: every window read is one shared-memory transaction.
// robustlr.ops.cupy_backend.phase_cols / shared_pitch mirror these.
template <int COLS, int STRIDE>
__host__ __device__ constexpr int lr_phase_cols() {
    return (COLS + STRIDE - 1) / STRIDE;
}

// The smallest pitch >= MIN with STEP * pitch = 16 (mod 32); MIN when there is none (STEP a
// multiple of 32).
template <int MIN, int STEP>
__host__ __device__ constexpr int lr_padded_pitch() {
    for (int extra = 0; extra < 32; ++extra) {
        if ((STEP * (MIN + extra)) % 32 == 16) return MIN + extra;
    }
    return MIN;
}

template <int COLS, int STRIDE, int STEP>
__host__ __device__ constexpr int lr_pitch() {
    return lr_padded_pitch<STRIDE * lr_phase_cols<COLS, STRIDE>(), STEP>();
}

// Position of column `col` in a phase-ordered row (see above).
template <int COLS, int STRIDE>
__host__ __device__ constexpr int lr_phase_col(int col) {
    return (col % STRIDE) * lr_phase_cols<COLS, STRIDE>() + col / STRIDE;
}

// Packed small images (lr_forward_packed, lr_backward_query_packed, lr_backward_input_packed):
// each block works on LR_SLOTS images of one group at a time (LR_SLOTS / 2 in the backward
// query), one per slot of LR_SLOT_W x 2 threads (x 4 in the backward query; a warp: two slots
// side by side), each slot staged with its own halo. The slots' staged rows lie at a pitch with
// STEP * pitch = 8, 16 or 24 (mod 32) words (STEP: the rows between a warp's two thread rows)
// and the slots lr_slot_floats apart, 16 (or 8) modulo 32 words, so that the four 8-word groups
// of a warp's window read (two slots x two thread rows) fall in 32 distinct banks.
// robustlr.ops.cupy_backend.slot_pitch / slot_floats mirror these.
#define LR_SLOT_W (LR_TILE_W / 2)
#define LR_SLOTS LR_TILE_H
// lr_forward_pairs, lr_backward_input_pairs: two images per block, each in a slot of LR_TILE_W
// columns and LR_TILE_H / 2 thread rows (two warps, one slot above the other), for images that
// fill at most half a tile's rows: a block of one tile would leave half its warps below the
// image (a 14 x 14 image in the 16 x 32 tiles of strips of 4). The slots are in different warps,
// so they need no relative bank placement: a slot is its rows at the tiled kernel's pitch.
#define LR_PAIR_SLOTS 2

// The layouts by slots per block: output columns and thread rows of a slot (1: the whole tile;
// LR_PAIR_SLOTS: half of it; LR_SLOTS: LR_SLOT_W x 2, two slots side by side in a warp), thread
// (tx, ty)'s slot, and the first slot of its warp.
template <int SLOTS>
__host__ __device__ constexpr int lr_slot_cols() {
    return SLOTS == LR_SLOTS ? LR_SLOT_W : LR_TILE_W;
}
template <int SLOTS>
__host__ __device__ constexpr int lr_slot_rows() {
    return SLOTS == LR_SLOTS ? 2 : LR_TILE_H / SLOTS;
}
template <int SLOTS>
__device__ __forceinline__ int lr_slot_of(int tx, int ty) {
    return SLOTS == LR_SLOTS ? (ty / 2) * 2 + tx / LR_SLOT_W : ty / lr_slot_rows<SLOTS>();
}
template <int SLOTS>
__device__ __forceinline__ int lr_warp_first_slot(int slot) {
    return SLOTS == LR_SLOTS ? slot & ~1 : slot;
}

template <int MIN, int STEP>
__host__ __device__ constexpr int lr_slot_pitch() {
    for (int extra = 0; extra < 32; ++extra) {
        const int phase = (STEP * (MIN + extra)) % 32;
        if (phase == 8 || phase == 16 || phase == 24) return MIN + extra;
    }
    return MIN;
}

template <int FLOATS, int ROW_PHASE>
__host__ __device__ constexpr int lr_slot_floats() {
    for (int extra = 0; extra < 32; ++extra) {
        if ((FLOATS + extra) % 32 == (ROW_PHASE == 16 ? 8 : 16)) return FLOATS + extra;
    }
    return FLOATS;
}

// Row pitch of the backward-input tiles (read at stride 1 by lanes that share words at larger
// strides; the two half-warps' reads lie R output rows apart at stride 1): padded at stride 1,
// unpadded otherwise. robustlr.ops.cupy_backend.plain_pitch mirrors it.
template <int COLS, int STRIDE, int R>
__host__ __device__ constexpr int lr_plain_pitch() {
    return STRIDE == 1 ? lr_padded_pitch<COLS, R>() : COLS;
}

// Pitch of the per-offset dlogit buffer of lr_backward_query: 8 modulo 32, so that the 32 lanes
// reading s_row[r * LR_RED_PITCH + e * 8 + part] (r = lane / 8, part = lane % 8) hit 32 banks.
#define LR_RED_PITCH (LR_THREADS + 8)

// Floats of one staged tile of lr_forward / lr_backward_query at strip R: the input rows and
// columns under a tile of LR_TILE_W x LR_TILE_H * R outputs, at the padded pitch.
template <int K, int STRIDE, int R>
__host__ __device__ constexpr int lr_query_tile() {
    return ((LR_TILE_H * R - 1) * STRIDE + K) *
           lr_pitch<(LR_TILE_W - 1) * STRIDE + K, STRIDE, R * STRIDE>();
}

// Floats of one thread row's copy of lr_backward_query's key gradient: the (R - 1) * STRIDE + K
// staged rows its strips read, at the k tile's pitch, padded to 16 modulo 32 words so that the
// two thread rows of a warp (whose copies lie one copy apart) add into 32 distinct banks.
// cupy_backend.key_grad_pitch mirrors it.
template <int K, int STRIDE, int R>
__host__ __device__ constexpr int lr_key_grad_pitch() {
    return lr_padded_pitch<((R - 1) * STRIDE + K) *
                               lr_pitch<(LR_TILE_W - 1) * STRIDE + K, STRIDE, R * STRIDE>(),
                           1>();
}

// Shared floats of lr_backward_query besides its channel tiles: the k tile, geo, the dlogit rows
// and partial sums of the grad-geo reduction, the block's grad geo, and with COPIES the key
// gradient (a copy per thread row).
template <int K, int STRIDE, int R, bool COPIES>
__host__ __device__ constexpr int lr_query_fixed() {
    return lr_query_tile<K, STRIDE, R>() + 2 * K * K + K * LR_RED_PITCH + K * 8 +
           (COPIES ? LR_TILE_H * lr_key_grad_pitch<K, STRIDE, R>() : 0);
}

// Outputs per thread of lr_forward and lr_backward_query (one geometry for both): 2, or 1 where
// lr_backward_query's shared arrays (at least one channel tile) would not fit 48 KB with 2. Their
// window loops are unrolled over the strip rows (every row test a constant); with MC
// accumulators (or gy values) per output, 2 outputs leave room under 128 registers (strips of
// 3 and 4 needed up to 148 and 162, and spilled under the cap). cupy_backend.query_strip mirrors
// it.
template <int K, int STRIDE>
__host__ __device__ constexpr int lr_query_strip() {
    return lr_query_fixed<K, STRIDE, 2, false>() + lr_query_tile<K, STRIDE, 2>() <= 12288 ? 2 : 1;
}

// Whether lr_backward_query's key-gradient copies fit in shared memory next to its other arrays
// and one channel tile; where not (large windows at strides >= 3), they live in a global
// workspace of the block (the same code through a generic pointer: slower, as correct).
// cupy_backend.key_grad_shared mirrors it.
template <int K, int STRIDE>
__host__ __device__ constexpr bool lr_key_grad_shared() {
    return lr_query_fixed<K, STRIDE, lr_query_strip<K, STRIDE>(), true>() +
               lr_query_tile<K, STRIDE, lr_query_strip<K, STRIDE>()>() <=
           12288;
}

// Input rows per thread of lr_backward_input: 4 at stride 1 (each input holds MC grad-x
// accumulators; a staged output row read once serves the strip's 4 inputs), 1 otherwise (at
// larger strides the outputs covering adjacent input rows differ from row to row).
// robustlr.ops.cupy_backend.input_strip mirrors it.
template <int K, int STRIDE>
__host__ __device__ constexpr int lr_input_strip() {
    return STRIDE == 1 ? 4 : 1;
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

// Floats of lr_forward's s_geo: the K * K prior logits. cupy_backend.kernel_tiles mirrors it.
template <int K>
__host__ __device__ constexpr int lr_forward_geo() {
    return K * K;
}

// Outputs per thread of lr_forward: 4 at K <= 7 where its k tile and LR_MAX_CHUNK channel tiles
// of a strip-of-4 tile fit 48 KB next to geo (stride 1), else lr_query_strip. Unrolled, strips
// of 4 keep the forward's R x MC accumulators within 128 registers with no spill up to K = 7
// (v6: with no neighbour test in its window loop; at K = 9 they spilled 4-20 bytes);
// backward_query, which also holds R x MC gy values, spilled 28 bytes at K = 7 and keeps
// lr_query_strip. Strips of 4 read (4 + K - 1) x K staged positions per 4 outputs instead of
// (2 + K - 1) x K per 2: 38% fewer shared-memory requests at K = 7.
// cupy_backend.forward_strip mirrors it.
template <int K, int STRIDE>
__host__ __device__ constexpr int lr_forward_strip() {
    constexpr int floats = (1 + LR_MAX_CHUNK) * lr_query_tile<K, STRIDE, 4>() + lr_forward_geo<K>();
    return K <= 7 && floats <= 12288 ? 4 : lr_query_strip<K, STRIDE>();
}

// The smallest weight sum the forward accepts from its bounded shift (2^-80): at most 168 other
// weights of a window flush to zero below 2^-126, under 2^-46 of such a sum.
#define LR_SUM_FLOOR 8.27180613e-25f

// What the k tiles of lr_forward and lr_backward_query hold where the tile leaves the image: a
// key so far from any query that sqdiff's and absdiff's logits there are -inf ((q - 1e30)^2
// overflows) or 1e30 below every finite shift, so its weight is exactly 0 with no test in the
// window loops; the derivatives there (2e30, +-1) stay finite, so 0 x them is 0. mul (whose
// logit q k may be anything) keeps its test.
#define LR_FAR_KEY 1.0e30f

// Shift a register window one place up and put v in slot 0: w[d] <- w[d - 1], w[0] <- v. The
// window loops keep per-window-row values of the rows a strip row serves this way (indices are
// compile-time constants, so the window stays in registers).
template <int N>
__device__ __forceinline__ void lr_shift_in(float* w, float v) {
#pragma unroll
    for (int d = N - 1; d > 0; --d) w[d] = w[d - 1];
    w[0] = v;
}

// Outputs of a strip of R rows from (i0, j) that exist: output r is in the image iff r < it.
template <int R>
__device__ __forceinline__ int lr_strip_outputs(long long i0, long long j, long long Ho,
                                                long long Wo) {
    return j < Wo && i0 < Ho ? (Ho - i0 < R ? (int)(Ho - i0) : R) : 0;
}

// lr_opaque(v) is v, in a way the compiler cannot see through: values derived from it are
// computed where they are used rather than hoisted out of the loops and held in registers through
// the window loops (the tile loader's per-thread geometry, 2 registers per element; a grid-stride
// loop's bound); a loop count that it hides is not known at compile time.
__device__ __forceinline__ int lr_opaque(int v) {
#ifdef __CUDA_ARCH__
    asm volatile("mov.b32 %0, %0;" : "+r"(v));
#endif
    return v;
}
__device__ __forceinline__ long long lr_opaque(long long v) {
#ifdef __CUDA_ARCH__
    asm volatile("mov.b64 %0, %0;" : "+l"(v));
#endif
    return v;
}

// Which of a strip's NT input rows (top + t) and K window columns (left + b) lie in the
// (H, W) image, worked out once per tile: one bit each (one register each through the window
// loops).
template <int NT, int K>
struct lr_window {
    static_assert(K <= 32 && NT <= 32, "one bit per window column and strip row");
    unsigned rows, cols;
    __device__ __forceinline__ lr_window(long long top, long long left, long long H,
                                         long long W) {
        // in 32 bits (a plane holds fewer than 2^31 positions: cupy_backend.offsets_fit), one
        // unsigned test each (a negative row or column is past the image too)
        const int top32 = (int)top, left32 = (int)left;
        const unsigned h = (unsigned)H, w = (unsigned)W;
        rows = 0;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            if ((unsigned)(top32 + t) < h) rows |= 1u << t;
        }
        cols = 0;
#pragma unroll
        for (int b = 0; b < K; ++b) {
            if ((unsigned)(left32 + b) < w) cols |= 1u << b;
        }
    }
    __device__ __forceinline__ bool row(int t) const { return (rows >> t) & 1u; }
    __device__ __forceinline__ bool col(int b) const { return (cols >> b) & 1u; }
};

// The window loops of lr_forward and lr_backward_query, one strip each: for each window column
// bb (a loop) and each of the strip's NT input rows t (unrolled: t is a constant in `row`),
// row(t, s, ok, gw) with s the shared index of input (t, bb) in a tile staged at pitch PW (phase
// order), ok whether that input lies in the image and gw[d] the prior logit of window row t - d
// in column bb (the caller's row tests skip the d past the window); then column_done(bb), also
// where live is false (a warp below the image: no rows, still every column's barriers).
template <int NT, int K, int L, int IW, int STRIDE, int PW, typename ROW, typename DONE>
__device__ __forceinline__ void lr_strip_columns(const lr_window<NT, K>& win, int base,
                                                 const float* __restrict__ s_geo, bool live,
                                                 ROW row, DONE column_done) {
    // (the count opaque: with K known, the compiler peels the first column off the loop, one
    // more copy of the window code per variant, about 470 instructions each in the forward)
#pragma unroll 1
    for (int bb = 0; bb < lr_opaque(K); ++bb) {
        if (live) {
            const bool col_ok = win.col(bb);
            const int sc = base + lr_phase_col<IW, STRIDE>(bb);
            float gw[L];
#pragma unroll
            for (int d = 0; d < L; ++d) gw[d] = 0.0f;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                lr_shift_in<L>(gw, t < K ? s_geo[t * K + bb] : 0.0f);
                row(t, sc + t * PW, col_ok && win.row(t), gw);
            }
        }
        column_done(bb);
    }
}

// The strip rows whose window holds strip row t (window row t - r * STRIDE in [0, K)) in the
// window loops of lr_forward and lr_backward_query: pair(r) for each (unrolled: r a constant).
template <int R, int K, int STRIDE, typename PAIR>
__device__ __forceinline__ void lr_strip_pairs(int t, PAIR pair) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int a = t - r * STRIDE;
        if (a >= 0 && a < K) pair(r);
    }
}

// Channels of a staged chunk of MC that sit side by side at each position (4, 2 or 1: the
// largest that divides MC): the chunk is stored as MC / V groups of V * TF floats (TF floats per
// channel tile), channel c of staged position s at (c / V) * V * TF + s * V + c % V, so that a
// window step reads each group with one V-word shared load (LDS.128 at V = 4: a warp request
// of 4 wavefronts instead of 4 requests of one; the same shared bandwidth, a quarter of the
// instructions). robustlr.ops.cupy_backend.vector_width mirrors it.
template <int MC>
__host__ __device__ constexpr int lr_vec_width() {
    return MC % 4 == 0 ? 4 : (MC % 2 == 0 ? 2 : 1);
}

template <int V>
struct alignas(4 * V) lr_vec {
    float v[V];
};

// out[e] = p[i * V + e], e < V, for p in shared memory: one V-word load on the GPU (p + i * V
// must be 4 * V-byte aligned: a GPU faults on a misaligned vector load, and so does the CUDA
// execution emulator of the tests).
template <int V>
__device__ __forceinline__ void lr_read_vec(const float* __restrict__ p, int i, float* out) {
#ifdef __CUDA_ARCH__
    const lr_vec<V> w = reinterpret_cast<const lr_vec<V>*>(p)[i];
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = w.v[e];
#else
#ifdef LR_EMU_CHECK_ALIGNMENT
    LR_EMU_CHECK_ALIGNMENT(p + i * V, 4 * V);
#endif
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = p[i * V + e];
#endif
}

// The MC staged channels (groups of V tiles of TF floats, lr_vec_width) at staged index s into
// xv (the loader fills the channels past a ragged group with 0).
template <int MC, int TF, int V>
__device__ __forceinline__ void lr_read_channels(const float* __restrict__ s_x, int s,
                                                 float* xv) {
#pragma unroll
    for (int c = 0; c < MC; c += V) lr_read_vec<V>(s_x + c * TF, s, xv + c);
}

// The key at shared index s of a staged k tile, and the MC staged channels of x at the same
// index into xv (lr_read_channels).
template <int MC, int TF, int V>
__device__ __forceinline__ float lr_read_staged(const float* __restrict__ s_k,
                                                const float* __restrict__ s_x, int s, float* xv) {
    const float kv = s_k[s];
    lr_read_channels<MC, TF, V>(s_x, s, xv);
    return kv;
}

// Most elements whose global loads a thread of the tile loader keeps in flight (registers it
// holds for them: a plane offset, a shared index and, through registers, the value).
#define LR_LOAD_BATCH 8

// What a tile loader stores for a value v with RESCALE (lr_load_planes): (origin - v) * factor,
// rounded as written (the backward input stages q scaled, origin 0, and the weights' shift
// (bound - lse) log2(e), as lr_backward_query forms them).
struct lr_rescale {
    float origin, factor;
    __device__ __forceinline__ float operator()(float v) const { return (origin - v) * factor; }
};

// out[i] = v for out in shared memory. On the GPU through its 32-bit shared-window address: from
// a generic pointer ptxas recomputed the window address (S2R, LEA) at every store of the loader.
__device__ __forceinline__ void lr_store_shared(float* out, int i, float v) {
#ifdef __CUDA_ARCH__
    const unsigned address = (unsigned)__cvta_generic_to_shared(out) + 4u * (unsigned)i;
    asm volatile("st.shared.f32 [%0], %1;" : : "r"(address), "f"(v) : "memory");
#else
    out[i] = v;
#endif
}

// Asynchronous tile copies: on sm_80+ an fp32 element goes from global to shared memory with
// cp.async, one instruction (LDGSTS) that holds no register for the value and writes zeros where
// the element lies outside the plane (its source ignored); a thread's copies land by its
// lr_copy_wait (cp.async.wait_all), which the tile loader runs before it returns. The CUDA
// execution emulator of the tests (LR_EMU_ASYNC_COPY) queues each copy until that wait, so a
// tile read without it reads the poison. 16-bit planes (converted to fp32 on the way) and older
// GPUs go through registers.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(LR_EMU_ASYNC_COPY)
#define LR_ASYNC_COPY 1
#else
#define LR_ASYNC_COPY 0
#endif

template <typename T>
struct lr_copies_async {
    static constexpr bool value = false;
};
template <>
struct lr_copies_async<float> {
    static constexpr bool value = LR_ASYNC_COPY;
};

// out[i] = inside ? *src : 0 for out in shared memory, landing by the next lr_copy_wait (with
// LR_ASYNC_COPY only; outside, src is not read).
__device__ __forceinline__ void lr_copy_async(float* out, int i, const float* src, bool inside) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned address = (unsigned)__cvta_generic_to_shared(out) + 4u * (unsigned)i;
    asm volatile(
        "{\n"
        "  .reg .pred ignore;\n"
        "  setp.eq.u32 ignore, %2, 0;\n"
        "  cp.async.ca.shared.global [%0], [%1], 4, ignore;\n"
        "}\n"
        :
        : "r"(address), "l"(src), "r"((unsigned)inside)
        : "memory");
#elif defined(LR_EMU_ASYNC_COPY)
    lr_emu::copy_async(out + i, inside ? src : nullptr);
#endif
}

// Wait until this thread's lr_copy_async copies have landed (a __syncthreads() after it makes
// them visible to the block).
__device__ __forceinline__ void lr_copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" : : : "memory");
#elif defined(LR_EMU_ASYNC_COPY)
    lr_emu::copy_wait();
#endif
}

// lr_opaque of a pointer (an address worked out once, then offset by 32-bit indices).
template <typename P>
__device__ __forceinline__ P* lr_opaque(P* v) {
#ifdef __CUDA_ARCH__
    asm volatile("mov.b64 %0, %0;" : "+l"(v));
#endif
    return v;
}

// Copy NP planes into shared memory as fp32: plane p < n is the ROWS x COLS window, top-left
// corner (r0, c0), of the (H, W) plane at src + p * src_stride, with `outside` where the window
// leaves the plane; planes n <= p < NP are zeros (the channels past a ragged group). Element
// (row, col) of plane p goes to dst[(p / V) * V * dst_stride + idx * V + p % V] with idx =
// row * PITCH + (PHASED ? lr_phase_col<COLS, STRIDE>(col) : col): groups of V planes side by
// side at each position (lr_vec_width; V = 1: plane p at p * dst_stride). With SLOTS > 1 (the
// packed kernels' tiles) the window of slot z < `slots` is that of the image at
// src + z * slot_stride, at idx + z * SLOT, and only its positions inside the image are written
// (those of the BOX_H x BOX_W image positions from (-r0, -c0) that the window holds): the rest
// keep what the caller filled them with once (lr_fill_shared), the slots z >= `slots` (no image)
// whatever they held. All threads of the block take part (tid in [0, LR_THREADS)).
// RESCALE: every element it writes is stored as (rescale.origin - v) * rescale.factor
// (lr_rescale), `outside` and the zeros past n included; the filled ones of SLOTS > 1 are not.
// With a `lead` (not null), one more plane comes first, with the same geometry: the window of
// the plane at lead_src goes to lead[idx] (no groups: V = 1), with lead_outside where the window
// leaves the plane, as is (RESCALE applies to the NP planes only). lr_backward_query copies its
// k tile so with its first chunk of channels, working out each position once for both.
// One geometry per position (v11): thread tid copies every plane at positions tid,
// tid + LR_THREADS, ..., so it works out a position's plane offset and shared index once for
// all NP planes. Within a group it takes the V planes in a rotated order, lane / (32 / V) first,
// so that a warp's copy writes 32 distinct banks where its 32 positions are consecutive (lanes
// 4a..4a+3 at V = 8 hit banks 8 (idx mod 4) + (p + a) mod 8) and reads 32 / V consecutive
// elements of each of V planes, as the v8-v10 loader did (one plane of each group a thread,
// 32 / V positions a warp, paying the geometry once per element of every group).
// Pipelined: constant trip counts; with lr_copies_async<T> (fp32 on sm_80+) every element is
// one lr_copy_async and a thread waits once, for all its planes, before it returns (with
// RESCALE, once per batch, then rescales the batch's elements in place); otherwise
// a thread issues the batch's global loads of a plane before the first of their shared stores
// (one memory latency per batch and plane).
template <int ROWS, int COLS, int STRIDE, int PITCH, bool PHASED, int NP, int V, int SLOTS = 1,
          int SLOT = 0, int BOX_H = ROWS, int BOX_W = COLS, bool RESCALE = false, typename T>
__device__ __forceinline__ void lr_load_planes(float* __restrict__ dst, int dst_stride,
                                               const T* __restrict__ src, long long src_stride,
                                               int n, long long r0, long long c0, long long H,
                                               long long W, int tid, float outside = 0.0f,
                                               long long slot_stride = 0, int slots = 1,
                                               lr_rescale rescale = {0.0f, 1.0f},
                                               float* __restrict__ lead = nullptr,
                                               const T* __restrict__ lead_src = nullptr,
                                               float lead_outside = 0.0f) {
    static_assert(NP % V == 0 && 32 % V == 0, "whole groups of planes, whole rotations a warp");
    // positions: the tile's, or the slots' image boxes with SLOTS > 1
    constexpr int N = SLOTS == 1 ? ROWS * COLS : SLOTS * BOX_H * BOX_W;
    constexpr int TRIPS = (N + LR_THREADS - 1) / LR_THREADS;
    constexpr int BATCH = TRIPS < LR_LOAD_BATCH ? TRIPS : LR_LOAD_BATCH;
    // the elements' geometry is worked out here, not kept across tiles; tid < LR_THREADS lets
    // the compiler drop the tile-end test of every trip but the last. In 32 bits: a plane (with
    // SLOTS > 1, the SLOTS images from src) holds fewer than 2^31 elements
    // (cupy_backend.offsets_fit refuses larger ones).
    tid = lr_opaque(tid) & (LR_THREADS - 1);
    const int h = (int)H, w = (int)W, top = (int)r0, left = (int)c0;
    const int turn = (tid & 31) / (32 / V);  // this thread's first plane of each group
    src = lr_opaque(src);
#pragma unroll 1
    for (int t0 = 0; t0 < TRIPS; t0 += BATCH) {
        int off[BATCH];  // offset in the plane, -1 outside it
        int to[BATCH];   // shared index of the group's first plane, -1 past the tile
#pragma unroll
        for (int t = 0; t < BATCH; ++t) {
            const int e = tid + (t0 + t) * LR_THREADS;  // the position
            if constexpr (SLOTS == 1) {
                const int row = e / COLS, col = e % COLS;
                const int r = top + row, c = left + col;
                // (unsigned: a negative row or column is past the plane too)
                const bool in = (unsigned)r < (unsigned)h && (unsigned)c < (unsigned)w;
                off[t] = e < N && in ? r * w + c : -1;
                to[t] = e < N ? (row * PITCH + (PHASED ? lr_phase_col<COLS, STRIDE>(col) : col)) * V
                              : -1;
            } else {  // image position (r, c) of slot z, staged at (r - r0, c - c0)
                const int z = e / (BOX_H * BOX_W), at = e % (BOX_H * BOX_W);
                const int r = at / BOX_W, c = at % BOX_W;
                const bool in = e < N && z < slots && r < h && c < w;
                const int row = r - top, col = c - left;
                off[t] = in ? z * (int)slot_stride + r * w + c : -1;
                const int at_col = PHASED ? lr_phase_col<COLS, STRIDE>(col) : col;
                to[t] = in ? (z * SLOT + row * PITCH + at_col) * V : -1;
            }
        }
        // plane p of the loop: the group's first plane p - p % V, this thread's (p + turn) % V
        // of it (V a power of 2); its source in 32 bits (a group's planes span fewer than 2^31
        // elements: cupy_backend.offsets_fit)
        const auto plane_of = [&](int p) { return (p & -V) | ((p + turn) & (V - 1)); };
        const auto shared_of = [&](int p) {
            return dst + (p & -V) * dst_stride + ((p + turn) & (V - 1));
        };
        const int plane_stride = (int)src_stride;
        if constexpr (lr_copies_async<T>::value) {
            if (lead != nullptr) {  // (uniform over the block)
#pragma unroll
                for (int t = 0; t < BATCH; ++t) {
                    if (to[t] < 0) continue;
                    const int at = (int)((unsigned)to[t] / V);
                    if (off[t] >= 0 || lead_outside == 0.0f) {
                        lr_copy_async(lead, at, lead_src + (off[t] >= 0 ? off[t] : 0), off[t] >= 0);
                    } else {
                        lr_store_shared(lead, at, lead_outside);
                    }
                }
            }
            // the groups whose V planes are all copied, then the rest: this plane copied, or
            // past n a zero fill (as where the window leaves the plane, unless `outside` is
            // not 0); an element outside the plane copies from the plane's start (not read)
            const int whole = n / V * V;
#pragma unroll 1
            for (int p = 0; p < whole; ++p) {
                float* const out = shared_of(p);
                const T* const plane = lr_opaque(src + plane_of(p) * plane_stride);
#pragma unroll
                for (int t = 0; t < BATCH; ++t) {
                    if (to[t] < 0) continue;
                    if (off[t] >= 0 || outside == 0.0f) {
                        lr_copy_async(out, to[t], plane + (off[t] >= 0 ? off[t] : 0), off[t] >= 0);
                    } else {
                        lr_store_shared(out, to[t], outside);
                    }
                }
            }
#pragma unroll 1
            for (int p = whole; p < NP; ++p) {
                float* const out = shared_of(p);
                const int plane_index = plane_of(p);
                const bool copied = plane_index < n;
                // (a plane past n is not read: no offset for it, which could pass 2^31)
                const T* const plane = lr_opaque(copied ? src + plane_index * plane_stride : src);
#pragma unroll
                for (int t = 0; t < BATCH; ++t) {
                    if (to[t] < 0) continue;
                    const bool inside = copied && off[t] >= 0;
                    if (inside || outside == 0.0f) {
                        lr_copy_async(out, to[t], plane + (off[t] >= 0 ? off[t] : 0), inside);
                    } else {
                        lr_store_shared(out, to[t], copied ? outside : 0.0f);
                    }
                }
            }
            if constexpr (RESCALE) {  // this thread's own elements, once they have landed
                lr_copy_wait();
#pragma unroll 1
                for (int p = 0; p < NP; ++p) {
                    float* const out = shared_of(p);
#pragma unroll
                    for (int t = 0; t < BATCH; ++t) {
                        if (to[t] >= 0) lr_store_shared(out, to[t], rescale(out[to[t]]));
                    }
                }
            }
        } else {
            if (lead != nullptr) {  // (uniform over the block)
                float v[BATCH];
#pragma unroll
                for (int t = 0; t < BATCH; ++t) {
                    v[t] = off[t] >= 0 ? lr_load(lead_src, off[t]) : lead_outside;
                }
#pragma unroll
                for (int t = 0; t < BATCH; ++t) {
                    if (to[t] >= 0) lr_store_shared(lead, (int)((unsigned)to[t] / V), v[t]);
                }
            }
#pragma unroll 1
            for (int p = 0; p < NP; ++p) {
                const int plane_index = plane_of(p);
                float* const out = shared_of(p);
                // (a null plane rather than a test of p: with the test, ptxas put the batch's
                // shared stores between its global loads, one memory latency per store)
                const T* plane = plane_index < n ? src + plane_index * plane_stride : nullptr;
                float v[BATCH];
                if (plane != nullptr) {
#pragma unroll
                    for (int t = 0; t < BATCH; ++t) {
                        v[t] = off[t] >= 0 ? lr_load(plane, off[t]) : outside;
                    }
                } else {
#pragma unroll
                    for (int t = 0; t < BATCH; ++t) v[t] = 0.0f;
                }
#pragma unroll
                for (int t = 0; t < BATCH; ++t) {
                    if (to[t] >= 0) lr_store_shared(out, to[t], RESCALE ? rescale(v[t]) : v[t]);
                }
            }
        }
    }
    if constexpr (lr_copies_async<T>::value && !RESCALE) lr_copy_wait();  // (RESCALE: waited)
}

// NP planes of a tile read at STRIDE by the window loops: phase order, row pitch PITCH
// (lr_pitch), groups of V planes side by side; a `lead` plane first where not null
// (lr_load_planes).
template <int ROWS, int COLS, int STRIDE, int PITCH, int NP, int V = 1, typename T>
__device__ __forceinline__ void lr_load_phased(float* __restrict__ dst, int dst_stride,
                                               const T* __restrict__ src, long long src_stride,
                                               int n, long long r0, long long c0, long long H,
                                               long long W, int tid, float outside = 0.0f,
                                               float* __restrict__ lead = nullptr,
                                               const T* __restrict__ lead_src = nullptr,
                                               float lead_outside = 0.0f) {
    lr_load_planes<ROWS, COLS, STRIDE, PITCH, true, NP, V>(
        dst, dst_stride, src, src_stride, n, r0, c0, H, W, tid, outside, 0, 1, {0.0f, 1.0f}, lead,
        lead_src, lead_outside);
}

// NP planes of the SLOTS images of a packed kernel's tile, each staged as a ROWS x COLS window
// from (r0, c0) <= (0, 0), read at STRIDE: phase order (or plain row order without PHASED), row
// pitch PITCH, slots SLOT floats apart, groups of V planes side by side; the image of slot z at
// src + z * slot_stride (z < `slots`). Only the positions inside the images are written, those
// of the BOX_H x BOX_W image positions from the image's corner (at most (H, W)) that the window
// holds: the caller fills the tiles once with what lies outside (lr_fill_shared).
template <int ROWS, int COLS, int STRIDE, int PITCH, int NP, int V, int SLOTS, int SLOT,
          int BOX_H, int BOX_W, bool PHASED = true, bool RESCALE = false, typename T>
__device__ __forceinline__ void lr_load_slots(float* __restrict__ dst, int dst_stride,
                                              const T* __restrict__ src, long long src_stride,
                                              int n, int r0, int c0, long long H, long long W,
                                              int tid, long long slot_stride, int slots,
                                              lr_rescale rescale = {0.0f, 1.0f}) {
    lr_load_planes<ROWS, COLS, STRIDE, PITCH, PHASED, NP, V, SLOTS, SLOT, BOX_H, BOX_W, RESCALE>(
        dst, dst_stride, src, src_stride, n, r0, c0, H, W, tid, 0.0f, slot_stride, slots,
        rescale);
}

// dst[i] = v for i < COUNT (a multiple of 4, dst 16-byte aligned) in shared memory, by every
// thread of the block: 4-word stores.
template <int COUNT>
__device__ __forceinline__ void lr_fill_shared(float* __restrict__ dst, float v, int tid) {
    static_assert(COUNT % 4 == 0, "whole 4-word stores");
    lr_vec<4> w;
#pragma unroll
    for (int e = 0; e < 4; ++e) w.v[e] = v;
#pragma unroll 1
    for (int i = tid; i < COUNT / 4; i += LR_THREADS) reinterpret_cast<lr_vec<4>*>(dst)[i] = w;
}

// dst[i] = v for i < COUNT (shared or global memory), by every thread of the block: each thread
// a constant count of predicated stores, ceil(COUNT / LR_THREADS), unrolled (as a loop the
// compiler unrolls it 4-fold with a remainder loop: about 80 instructions a thread for the
// backward query's key-gradient copies, where the stores take 26).
template <int COUNT>
__device__ __forceinline__ void lr_fill_each(float* __restrict__ dst, float v, int tid) {
#pragma unroll
    for (int e = 0; e < COUNT; e += LR_THREADS) {
        if (e + tid < COUNT) dst[e + tid] = v;
    }
}

// NP planes of a tile in plain row order with row pitch PITCH, groups of V planes side by side.
template <int ROWS, int COLS, int PITCH, int NP, int V = 1, bool RESCALE = false, typename T>
__device__ __forceinline__ void lr_load_tile(float* __restrict__ dst, int dst_stride,
                                             const T* __restrict__ src, long long src_stride,
                                             int n, long long r0, long long c0, long long H,
                                             long long W, int tid, float outside = 0.0f,
                                             lr_rescale rescale = {0.0f, 1.0f}) {
    lr_load_planes<ROWS, COLS, 1, PITCH, false, NP, V, 1, 0, ROWS, COLS, RESCALE>(
        dst, dst_stride, src, src_stride, n, r0, c0, H, W, tid, outside, 0, 1, rescale);
}

// Stage the K * K prior logits of one group in base 2 less their bound (lr_logit2): dst[e] =
// (src[e] - bound) * log2(e), the bound their largest (fmaxf skips a NaN; -3e38, finite, where
// every one is -inf), worked out by each warp from global memory, the same in every thread with
// no barrier (all 32 lanes must call). nan_prior: a prior logit is NaN. The caller's barrier
// orders the stores before the reads. Every K works with any block size (K * K may exceed
// LR_THREADS: 169 at K = 13).
template <int KK>
__device__ __forceinline__ float lr_stage_geo(float* __restrict__ dst,
                                              const float* __restrict__ src, int tid,
                                              bool& nan_prior) {
    float bound = -3.0e38f;
    bool nan = false;
#pragma unroll
    for (int e0 = 0; e0 < KK; e0 += 32) {  // (unrolled)
        const int e = e0 + (tid & 31);
        const float v = e < KK ? lr_load(src, e) : bound;
        bound = fmaxf(bound, v);
        nan = nan || v != v;
    }
#pragma unroll
    for (int d = 16; d > 0; d /= 2) bound = fmaxf(bound, __shfl_xor_sync(0xffffffffu, bound, d));
    nan_prior = __any_sync(0xffffffffu, nan);
    if (KK <= LR_THREADS) {  // no loop (the compiler would unroll one for any block size)
        if (tid < KK) dst[tid] = (lr_load(src, tid) - bound) * LR_LOG2E;
    } else {
        for (int e = tid; e < KK; e += LR_THREADS) dst[e] = (lr_load(src, e) - bound) * LR_LOG2E;
    }
    return bound;
}
