// Local relation op, CUDA kernels v3 (DESIGN.md §1): tiled, no per-thread window arrays.
//
// Templated on the storage type T (float, lr_half, lr_bf16; all arithmetic in fp32), the window
// size K and the stride; every tensor extent is a kernel argument and every offset is 64-bit.
// The composability is a runtime argument (LR_SQDIFF, LR_ABSDIFF, LR_MUL).
//
// Layouts (all contiguous NCHW): x (B, C, H, W), q (B, G, Ho, Wo), k (B, G, H, W), geo (G, K, K)
// in fp32, y (B, C, Ho, Wo), lse (B, G, Ho, Wo) in fp32. Channel c belongs to group c / m, the
// last group may hold fewer than m channels. Output (i, j) reads input
// (i * STRIDE - K / 2 + a, j * STRIDE - K / 2 + b); neighbours outside the image are left out of
// the softmax.
//
// Every block is LR_TILE_W x LR_TILE_H threads and works on one tile of one (b, g) plane at a
// time (grid-stride over tiles, so any grid size is correct). The tile's k (or q) with its halo
// and MC = lr_chunk channels of x (or gy) are staged in shared memory (fp32); the window loops
// run over offsets outside and the staged channels inside, so a thread holds MC accumulators,
// never a K x K array. Strided window reads go through the phase-ordered, padded layout of
// lr_common.cuh (one shared-memory transaction per warp request, counted by
// tests/test_kernels_budget.py).
//
// Forward, two passes over the window (FlashAttention's softmax without the rescaling): the
// largest logit, then exp(logit - max) accumulated into the sum and the MC channel outputs.
// Backward (p = softmax weights of one (b, g, i, j), recomputed from the saved lse; gy = grad y):
//   dw_o = sum_{c in g} gy_c x_{o,c},  D = sum_c gy_c y_c (FlashAttention's delta, from the
//   saved output), dlogit_o = p_o (dw_o - D), formed offset by offset.
// lr_backward_query owns the query positions: grad q, D (for the second kernel), and one
// partial sum of grad geo per block (each window row's dlogits reduced through shared memory in
// a fixed order; the caller sums the partials with torch.sum, so grad geo is deterministic for
// a given grid). lr_backward_input owns the input positions: it gathers grad x and grad k from
// the outputs whose window covers them. No atomics anywhere.
#include "lr_common.cuh"


// Forward, fused: logits, softmax and aggregation; one thread per output (i, j) of a tile.
// Shared: the k tile (logits) and MC channel tiles of x.
template <typename T, int K, int STRIDE>
__global__ void lr_forward(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, T* __restrict__ y, float* __restrict__ lse, long long B,
    long long C, long long H, long long W, long long G, long long m, long long Ho, long long Wo,
    int comp) {
    constexpr int P = K / 2;
    constexpr int KK = K * K;
    constexpr int IH = (LR_TILE_H - 1) * STRIDE + K;  // input rows under one output tile
    constexpr int IW = (LR_TILE_W - 1) * STRIDE + K;
    constexpr int PW = lr_pitch<IW, STRIDE>();  // row pitch of the shared tiles
    constexpr int TF = IH * PW;                 // floats of one shared tile
    constexpr int MC = lr_chunk<TF + KK, TF>();
    LR_SHARED(float, s_k, TF);
    LR_SHARED(float, s_x, MC * TF);
    LR_SHARED(float, s_geo, KK);
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * LR_TILE_W + tx;
    const long long tiles_w = (Wo + LR_TILE_W - 1) / LR_TILE_W;
    const long long tiles_h = (Ho + LR_TILE_H - 1) / LR_TILE_H;
    const long long ntiles = B * G * tiles_h * tiles_w;
    const int base = ty * STRIDE * PW + tx;  // this thread's window in the tiles

    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const long long tw = tile % tiles_w;
        const long long th = (tile / tiles_w) % tiles_h;
        const long long g = (tile / (tiles_w * tiles_h)) % G;
        const long long b = tile / (tiles_w * tiles_h * G);
        const long long i = th * LR_TILE_H + ty, j = tw * LR_TILE_W + tx;
        const long long r0 = th * LR_TILE_H * STRIDE - P, c0 = tw * LR_TILE_W * STRIDE - P;
        const bool active = i < Ho && j < Wo;
        const long long qidx = ((b * G + g) * Ho + i) * Wo + j;

        __syncthreads();  // the previous tile is done with s_k, s_x and s_geo
        lr_load_geo<KK>(s_geo, geo + g * KK, tid);
        lr_load_phased<IH, IW, STRIDE>(s_k, k + (b * G + g) * H * W, r0, c0, H, W, tid);
        __syncthreads();

        const float qv = active ? lr_load(q, qidx) : 0.0f;
        const long long top = i * STRIDE - P, left = j * STRIDE - P;
        // pass 1: the largest logit in the image (fmaxf skips a NaN logit; pass 2 turns it
        // into a NaN weight, so NaN in gives NaN out)
        float peak = -3.0e38f;
#pragma unroll 1
        for (int a = 0; a < K; ++a) {
            const bool row_ok = top + a >= 0 && top + a < H;
#pragma unroll
            for (int bb = 0; bb < K; ++bb) {
                const bool ok = row_ok && left + bb >= 0 && left + bb < W;
                const float kv = s_k[base + a * PW + lr_phase_col<IW, STRIDE>(bb)];
                const float l = lr_phi(comp, qv, kv) + s_geo[a * K + bb];
                if (ok) peak = fmaxf(peak, l);
            }
        }

        // pass 2, per chunk of MC channels: weights, their sum and the MC outputs
        const long long c_first = g * m;
        const long long c_end = c_first + m < C ? c_first + m : C;
        for (long long cc = c_first; cc < c_end; cc += MC) {
            const int nc = c_end - cc < MC ? (int)(c_end - cc) : MC;
            __syncthreads();  // everyone is done with the previous chunk in s_x
            for (int c = 0; c < nc; ++c) {
                lr_load_phased<IH, IW, STRIDE>(s_x + c * TF, x + (b * C + cc + c) * H * W, r0,
                                               c0, H, W, tid);
            }
            __syncthreads();
            float acc[MC];
#pragma unroll
            for (int c = 0; c < MC; ++c) acc[c] = 0.0f;
            float sum = 0.0f;
#pragma unroll 1
            for (int a = 0; a < K; ++a) {
                const bool row_ok = top + a >= 0 && top + a < H;
#pragma unroll
                for (int bb = 0; bb < K; ++bb) {
                    const bool ok = row_ok && left + bb >= 0 && left + bb < W;
                    const int s = base + a * PW + lr_phase_col<IW, STRIDE>(bb);
                    const float l = lr_phi(comp, qv, s_k[s]) + s_geo[a * K + bb];
                    const float p = ok ? expf(l - peak) : 0.0f;
                    sum += p;
#pragma unroll
                    for (int c = 0; c < MC; ++c) {
                        if (c < nc) acc[c] += p * s_x[c * TF + s];
                    }
                }
            }
            if (active && cc == c_first) lse[qidx] = peak + logf(sum);
            const float inv = 1.0f / sum;
#pragma unroll
            for (int c = 0; c < MC; ++c) {
                if (active && c < nc) {
                    lr_store(y, ((b * C + cc + c) * Ho + i) * Wo + j, acc[c] * inv);
                }
            }
        }
    }
}

// Pitch of the per-row dlogit buffer of lr_backward_query: 8 modulo 32, so that the 32 lanes
// reading s_row[r * LR_RED_PITCH + e * 8 + part] (r = lane / 8, part = lane % 8) hit 32 banks.
#define LR_RED_PITCH (LR_THREADS + 8)

// Sum over the block of the K dlogits of one window row (s_row[bb * LR_RED_PITCH + tid]), in a
// fixed order: 8 threads per offset sum 16 values each, then one thread per offset sums those 8
// and adds the result to acc[bb]. Every thread of the block calls it.
template <int K>
__device__ __forceinline__ void lr_reduce_row(const float* __restrict__ s_row,
                                              float* __restrict__ s_part, float* __restrict__ acc,
                                              int tid) {
    static_assert(K * 8 <= LR_THREADS, "one row of offsets is reduced by 8 threads each");
    __syncthreads();  // the row is complete
    if (tid < K * 8) {
        const int r = tid / 8, part = tid % 8;
        float v = 0.0f;
#pragma unroll
        for (int e = 0; e < LR_THREADS / 8; ++e) v += s_row[r * LR_RED_PITCH + e * 8 + part];
        s_part[tid] = v;
    }
    __syncthreads();  // s_part is complete and s_row may be overwritten
    if (tid < K) {
        float v = 0.0f;
#pragma unroll
        for (int p = 0; p < 8; ++p) v += s_part[tid * 8 + p];
        acc[tid] += v;
    }
}

// Backward, query side. Grid: G * nchunks blocks; block (g, chunk) takes the tiles chunk,
// chunk + nchunks, ... of group g's (b, tile) list. Per output it writes grad q and D; the
// block's sum of dlogit per window offset goes to geo_partial[(g * K * K + o) * nchunks + chunk].
template <typename T, int K, int STRIDE>
__global__ void lr_backward_query(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, const float* __restrict__ lse, const T* __restrict__ y,
    const T* __restrict__ gy, T* __restrict__ gq, float* __restrict__ dsum,
    float* __restrict__ geo_partial, long long B, long long C, long long H, long long W,
    long long G, long long m, long long Ho, long long Wo, long long nchunks, int comp) {
    constexpr int P = K / 2;
    constexpr int KK = K * K;
    constexpr int IH = (LR_TILE_H - 1) * STRIDE + K;
    constexpr int IW = (LR_TILE_W - 1) * STRIDE + K;
    constexpr int PW = lr_pitch<IW, STRIDE>();
    constexpr int TF = IH * PW;
    constexpr int MC = lr_chunk<TF + 2 * KK + K * LR_RED_PITCH + K * 8, TF>();
    LR_SHARED(float, s_k, TF);
    LR_SHARED(float, s_x, MC * TF);
    LR_SHARED(float, s_geo, KK);
    LR_SHARED(float, s_row, K * LR_RED_PITCH);
    LR_SHARED(float, s_part, K * 8);
    LR_SHARED(float, s_gacc, KK);  // the block's grad geo, accumulated in a fixed order
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * LR_TILE_W + tx;
    const long long g = blockIdx.x / nchunks;
    const long long chunk = blockIdx.x % nchunks;
    const long long tiles_w = (Wo + LR_TILE_W - 1) / LR_TILE_W;
    const long long tiles_h = (Ho + LR_TILE_H - 1) / LR_TILE_H;
    const long long ntiles = B * tiles_h * tiles_w;  // of this group
    const int base = ty * STRIDE * PW + tx;
    lr_load_geo<KK>(s_geo, geo + g * KK, tid);
    for (int e = tid; e < KK; e += LR_THREADS) s_gacc[e] = 0.0f;
    const long long c_first = g * m;
    const long long c_end = c_first + m < C ? c_first + m : C;

    for (long long tile = chunk; tile < ntiles; tile += nchunks) {
        const long long tw = tile % tiles_w;
        const long long th = (tile / tiles_w) % tiles_h;
        const long long b = tile / (tiles_w * tiles_h);
        const long long i = th * LR_TILE_H + ty, j = tw * LR_TILE_W + tx;
        const long long r0 = th * LR_TILE_H * STRIDE - P, c0 = tw * LR_TILE_W * STRIDE - P;
        const bool active = i < Ho && j < Wo;
        const long long qidx = ((b * G + g) * Ho + i) * Wo + j;

        __syncthreads();  // the previous tile is done with s_k (and s_geo, s_gacc are set)
        lr_load_phased<IH, IW, STRIDE>(s_k, k + (b * G + g) * H * W, r0, c0, H, W, tid);
        const float qv = active ? lr_load(q, qidx) : 0.0f;
        const float lse_v = active ? lse[qidx] : 0.0f;
        // D = sum_c gy_c y_c from the saved output
        float dv = 0.0f;
        if (active) {
            for (long long c = c_first; c < c_end; ++c) {
                const long long yidx = ((b * C + c) * Ho + i) * Wo + j;
                dv += lr_load(gy, yidx) * lr_load(y, yidx);
            }
        }
        const long long top = i * STRIDE - P, left = j * STRIDE - P;
        float gqv = 0.0f;
        for (long long cc = c_first; cc < c_end; cc += MC) {
            const int nc = c_end - cc < MC ? (int)(c_end - cc) : MC;
            __syncthreads();  // everyone is done with the previous chunk in s_x
            for (int c = 0; c < nc; ++c) {
                lr_load_phased<IH, IW, STRIDE>(s_x + c * TF, x + (b * C + cc + c) * H * W, r0,
                                               c0, H, W, tid);
            }
            __syncthreads();
            float gyv[MC];
#pragma unroll
            for (int c = 0; c < MC; ++c) {
                gyv[c] = active && c < nc ? lr_load(gy, ((b * C + cc + c) * Ho + i) * Wo + j)
                                          : 0.0f;
            }
            const float dsub = cc == c_first ? dv : 0.0f;  // the delta term, once per output
#pragma unroll 1
            for (int a = 0; a < K; ++a) {
                const bool row_ok = active && top + a >= 0 && top + a < H;
#pragma unroll
                for (int bb = 0; bb < K; ++bb) {
                    const bool ok = row_ok && left + bb >= 0 && left + bb < W;
                    const int s = base + a * PW + lr_phase_col<IW, STRIDE>(bb);
                    const float kv = s_k[s];
                    const float p = ok ? expf(lr_phi(comp, qv, kv) + s_geo[a * K + bb] - lse_v)
                                       : 0.0f;
                    float dw = 0.0f;
#pragma unroll
                    for (int c = 0; c < MC; ++c) {
                        if (c < nc) dw += gyv[c] * s_x[c * TF + s];
                    }
                    const float dl = ok ? p * (dw - dsub) : 0.0f;
                    gqv += dl * lr_dphi_dq(comp, qv, kv);
                    s_row[bb * LR_RED_PITCH + tid] = dl;
                }
                lr_reduce_row<K>(s_row, s_part, s_gacc + a * K, tid);
            }
        }
        if (active) {
            dsum[qidx] = dv;
            lr_store(gq, qidx, gqv);
        }
    }
    __syncthreads();  // s_gacc is complete
    for (int e = tid; e < KK; e += LR_THREADS) {
        geo_partial[(g * KK + e) * nchunks + chunk] = s_gacc[e];
    }
}

// Backward, input side: one thread per input position (h, w) of a tile of one (b, g) plane. It
// gathers grad x for the channels of group g at (h, w) and grad k at (b, g, h, w) from the
// (at most NC x NC) outputs whose window covers (h, w). Shared: q, lse and D over the outputs
// covering the tile, and gy of MC channels over the same outputs.
template <typename T, int K, int STRIDE>
__global__ void lr_backward_input(
    const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
    const float* __restrict__ geo, const float* __restrict__ lse, const float* __restrict__ dsum,
    const T* __restrict__ gy, T* __restrict__ gx, T* __restrict__ gk, long long B, long long C,
    long long H, long long W, long long G, long long m, long long Ho, long long Wo, int comp) {
    constexpr int P = K / 2;
    constexpr int KK = K * K;
    constexpr int NC = (K - 1) / STRIDE + 1;  // most outputs covering an input, per axis
    // output rows / columns staged per tile: i_first of the tile's last row is at most
    // ceil((LR_TILE_H - 1) / STRIDE) past the first row's, and each row reads NC of them
    constexpr int OH = (LR_TILE_H + STRIDE - 2) / STRIDE + NC;
    constexpr int OW = (LR_TILE_W + STRIDE - 2) / STRIDE + NC;
    constexpr int PO = lr_plain_pitch<OW, STRIDE>();  // row pitch of the shared tiles
    constexpr int TO = OH * PO;
    constexpr int MC = lr_chunk<3 * TO + KK, TO>();
    LR_SHARED(float, s_q, TO);
    LR_SHARED(float, s_lse, TO);
    LR_SHARED(float, s_d, TO);
    LR_SHARED(float, s_gy, MC * TO);
    LR_SHARED(float, s_geo, KK);
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * LR_TILE_W + tx;
    const long long tiles_w = (W + LR_TILE_W - 1) / LR_TILE_W;
    const long long tiles_h = (H + LR_TILE_H - 1) / LR_TILE_H;
    const long long ntiles = B * G * tiles_h * tiles_w;

    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const long long tw = tile % tiles_w;
        const long long th = (tile / tiles_w) % tiles_h;
        const long long g = (tile / (tiles_w * tiles_h)) % G;
        const long long b = tile / (tiles_w * tiles_h * G);
        const long long h0 = th * LR_TILE_H, w0 = tw * LR_TILE_W;
        const long long h = h0 + ty, wc = w0 + tx;
        const bool active = h < H && wc < W;
        // first output row / column whose window can cover the tile
        const long long oi0 = lr_floor_div(h0 + P - K + STRIDE, STRIDE);
        const long long oj0 = lr_floor_div(w0 + P - K + STRIDE, STRIDE);
        const long long plane = (b * G + g) * Ho * Wo;

        __syncthreads();
        lr_load_geo<KK>(s_geo, geo + g * KK, tid);
        lr_load_tile<OH, OW, PO>(s_q, q + plane, oi0, oj0, Ho, Wo, tid);
        lr_load_tile<OH, OW, PO>(s_lse, lse + plane, oi0, oj0, Ho, Wo, tid);
        lr_load_tile<OH, OW, PO>(s_d, dsum + plane, oi0, oj0, Ho, Wo, tid);

        // the outputs covering (h, wc): i = i_first + ti, j = j_first + tj, ti, tj in [0, NC)
        const long long i_first = lr_floor_div(h + P - K + STRIDE, STRIDE);
        const long long j_first = lr_floor_div(wc + P - K + STRIDE, STRIDE);
        const int sbase = (int)((i_first - oi0) * PO + (j_first - oj0));
        const float kv = active ? lr_load(k, ((b * G + g) * H + h) * W + wc) : 0.0f;
        float gk_acc = 0.0f;
        const long long c_first = g * m;
        const long long c_end = c_first + m < C ? c_first + m : C;
        for (long long cc = c_first; cc < c_end; cc += MC) {
            const int nc = c_end - cc < MC ? (int)(c_end - cc) : MC;
            __syncthreads();  // everyone is done with the previous chunk in s_gy
            for (int c = 0; c < nc; ++c) {
                lr_load_tile<OH, OW, PO>(s_gy + c * TO, gy + (b * C + cc + c) * Ho * Wo, oi0,
                                         oj0, Ho, Wo, tid);
            }
            __syncthreads();
            const bool first = cc == c_first;
            float gxv[MC], gkc[MC];
#pragma unroll
            for (int c = 0; c < MC; ++c) gxv[c] = gkc[c] = 0.0f;
#pragma unroll 1
            for (int ti = 0; ti < NC; ++ti) {
#pragma unroll
                for (int tj = 0; tj < NC; ++tj) {
                    const long long i = i_first + ti, j = j_first + tj;
                    const long long a = h + P - i * STRIDE, bb = wc + P - j * STRIDE;
                    const bool ok = active && i >= 0 && i < Ho && j >= 0 && j < Wo && a >= 0 &&
                                    bb >= 0;
                    const int s = sbase + ti * PO + tj;
                    const int o = ok ? (int)(a * K + bb) : 0;
                    const float qv = s_q[ok ? s : 0];
                    const float e = expf(lr_phi(comp, qv, kv) + s_geo[o] - s_lse[ok ? s : 0]);
                    const float wt = ok ? e : 0.0f;
                    const float wdk = wt * lr_dphi_dk(comp, qv, kv);
                    if (first) gk_acc -= wdk * s_d[ok ? s : 0];  // the delta term
#pragma unroll
                    for (int c = 0; c < MC; ++c) {
                        if (c < nc) {
                            const float v = s_gy[c * TO + s];
                            gxv[c] += wt * v;
                            gkc[c] += wdk * v;
                        }
                    }
                }
            }
#pragma unroll
            for (int c = 0; c < MC; ++c) {
                if (active && c < nc) {
                    const long long xidx = ((b * C + cc + c) * H + h) * W + wc;
                    gk_acc += lr_load(x, xidx) * gkc[c];
                    lr_store(gx, xidx, gxv[c]);
                }
            }
        }
        if (active) lr_store(gk, ((b * G + g) * H + h) * W + wc, gk_acc);
    }
}
