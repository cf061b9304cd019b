// Local relation op, CUDA kernels v2 (DESIGN.md §1): tiled, per-thread window state in
// registers.
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
// time (grid-stride over tiles, so any grid size is correct). The tile's inputs, with their
// halo, are staged in shared memory (fp32); window loops run over compile-time bounds
// (#pragma unroll) with validity masks, so the per-thread window arrays stay in registers
// (ptxas: 0 bytes of stack frame for K <= 7, checked by tests/test_kernels_budget.py). At stride 1
// the shared tiles' row pitch is padded (lr_pitch) so that every window read of a warp is one
// shared-memory transaction (tests/test_kernels_budget.py counts them).
//
// Backward (w = softmax weights of one (b, g, i, j), gy = grad of y):
//   dw_o = sum_{c in g} gy_c x_{o,c},  D = sum_o w_o dw_o (= sum_c gy_c y_c),
//   dlogit_o = w_o (dw_o - D).
// lr_backward_query owns the query positions: grad q, D (for the second kernel), and one
// partial sum of grad geo per block (block reduction through shared memory in a fixed order;
// the caller sums the partials with torch.sum, so grad geo is deterministic for a given grid).
// lr_backward_input owns the input positions: it gathers grad x and grad k from the outputs
// whose window covers them, recomputing the weights from the saved lse. No atomics anywhere.
#include "lr_common.cuh"

// Forward, fused: logits, softmax and aggregation; one thread per output (i, j) of a tile.
// Shared: the k tile (logits), then the x tile of each channel of the group.
template <typename T, int K, int STRIDE>
__global__ void lr_forward(const T* __restrict__ x, const T* __restrict__ q, const T* __restrict__ k,
               const float* __restrict__ geo, T* __restrict__ y, float* __restrict__ lse,
               long long B, long long C, long long H, long long W, long long G, long long m,
               long long Ho, long long Wo, int comp) {
    constexpr int P = K / 2;
    constexpr int KK = K * K;
    constexpr int IH = (LR_TILE_H - 1) * STRIDE + K;  // input rows under one output tile
    constexpr int IW = (LR_TILE_W - 1) * STRIDE + K;
    constexpr int PW = lr_pitch<IW, STRIDE>();  // row pitch of the shared tiles
    LR_SHARED(float, s_in, IH * PW);
    LR_SHARED(float, s_geo, KK);
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * LR_TILE_W + tx;
    const long long tiles_w = (Wo + LR_TILE_W - 1) / LR_TILE_W;
    const long long tiles_h = (Ho + LR_TILE_H - 1) / LR_TILE_H;
    const long long ntiles = B * G * tiles_h * tiles_w;
    const int base = ty * STRIDE * PW + tx * STRIDE;  // this thread's window in the tile

    for (long long tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const long long tw = tile % tiles_w;
        const long long th = (tile / tiles_w) % tiles_h;
        const long long g = (tile / (tiles_w * tiles_h)) % G;
        const long long b = tile / (tiles_w * tiles_h * G);
        const long long i = th * LR_TILE_H + ty, j = tw * LR_TILE_W + tx;
        const long long r0 = th * LR_TILE_H * STRIDE - P, c0 = tw * LR_TILE_W * STRIDE - P;
        const bool active = i < Ho && j < Wo;
        const long long qidx = ((b * G + g) * Ho + i) * Wo + j;

        __syncthreads();  // the previous tile is done with s_in and s_geo
        lr_load_geo<KK>(s_geo, geo + g * KK, tid);
        lr_load_tile<IH, IW, PW>(s_in, k + (b * G + g) * H * W, r0, c0, H, W, tid);
        __syncthreads();

        const float qv = active ? lr_load(q, qidx) : 0.0f;
        // rows / columns of the window inside the image: a in [a_lo, a_hi)
        const long long top = i * STRIDE - P, left = j * STRIDE - P;
        float w[KK];
        float peak = -3.0e38f;
#pragma unroll
        for (int a = 0; a < K; ++a) {
#pragma unroll
            for (int bb = 0; bb < K; ++bb) {
                const bool ok = top + a >= 0 && top + a < H && left + bb >= 0 && left + bb < W;
                const float l = lr_phi(comp, qv, s_in[base + a * PW + bb]) + s_geo[a * K + bb];
                w[a * K + bb] = ok ? l : -3.0e38f;
                peak = fmaxf(peak, w[a * K + bb]);
            }
        }
        float sum = 0.0f;
#pragma unroll
        for (int o = 0; o < KK; ++o) {
            // NaN logits (a NaN q, k or geo) give a NaN weight, so NaN in gives NaN out
            w[o] = !(w[o] <= -1.0e38f) ? expf(w[o] - peak) : 0.0f;
            sum += w[o];
        }
        if (active) lse[qidx] = peak + logf(sum);
        const float inv = 1.0f / sum;

        const long long c_end = g * m + m < C ? g * m + m : C;
        for (long long c = g * m; c < c_end; ++c) {
            __syncthreads();  // everyone is done with the previous tile in s_in
            lr_load_tile<IH, IW, PW>(s_in, x + (b * C + c) * H * W, r0, c0, H, W, tid);
            __syncthreads();
            float acc = 0.0f;
#pragma unroll
            for (int a = 0; a < K; ++a) {
#pragma unroll
                for (int bb = 0; bb < K; ++bb) acc += w[a * K + bb] * s_in[base + a * PW + bb];
            }
            if (active) lr_store(y, ((b * C + c) * Ho + i) * Wo + j, acc * inv);
        }
    }
}

// Backward, query side. Grid: G * nchunks blocks; block (g, chunk) takes the tiles chunk,
// chunk + nchunks, ... of group g's (b, tile) list. Per output it writes grad q and D; the
// block's sum of dlogit per window offset goes to geo_partial[(g * K * K + o) * nchunks + chunk].
template <typename T, int K, int STRIDE>
__global__ void lr_backward_query(const T* __restrict__ x, const T* __restrict__ q,
                      const T* __restrict__ k, const float* __restrict__ geo,
                      const float* __restrict__ lse, const T* __restrict__ gy,
                      T* __restrict__ gq, float* __restrict__ dsum,
                      float* __restrict__ geo_partial, long long B, long long C, long long H,
                      long long W, long long G, long long m, long long Ho, long long Wo,
                      long long nchunks, int comp) {
    constexpr int P = K / 2;
    constexpr int KK = K * K;
    constexpr int IH = (LR_TILE_H - 1) * STRIDE + K;
    constexpr int IW = (LR_TILE_W - 1) * STRIDE + K;
    constexpr int PW = lr_pitch<IW, STRIDE>();
    LR_SHARED(float, s_k, IH * PW);
    LR_SHARED(float, s_x, IH * PW);
    LR_SHARED(float, s_geo, KK);
    LR_SHARED(float, s_red, LR_THREADS / 16 * LR_THREADS);
    LR_SHARED(float, s_part, LR_THREADS);
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * LR_TILE_W + tx;
    const long long g = blockIdx.x / nchunks;
    const long long chunk = blockIdx.x % nchunks;
    const long long tiles_w = (Wo + LR_TILE_W - 1) / LR_TILE_W;
    const long long tiles_h = (Ho + LR_TILE_H - 1) / LR_TILE_H;
    const long long ntiles = B * tiles_h * tiles_w;  // of this group
    const int base = ty * STRIDE * PW + tx * STRIDE;
    lr_load_geo<KK>(s_geo, geo + g * KK, tid);

    float gacc[KK];
#pragma unroll
    for (int o = 0; o < KK; ++o) gacc[o] = 0.0f;

    for (long long tile = chunk; tile < ntiles; tile += nchunks) {
        const long long tw = tile % tiles_w;
        const long long th = (tile / tiles_w) % tiles_h;
        const long long b = tile / (tiles_w * tiles_h);
        const long long i = th * LR_TILE_H + ty, j = tw * LR_TILE_W + tx;
        const long long r0 = th * LR_TILE_H * STRIDE - P, c0 = tw * LR_TILE_W * STRIDE - P;
        const bool active = i < Ho && j < Wo;
        const long long qidx = ((b * G + g) * Ho + i) * Wo + j;

        __syncthreads();
        lr_load_tile<IH, IW, PW>(s_k, k + (b * G + g) * H * W, r0, c0, H, W, tid);
        __syncthreads();
        const float qv = active ? lr_load(q, qidx) : 0.0f;
        const float lse_v = active ? lse[qidx] : 0.0f;
        const long long top = i * STRIDE - P, left = j * STRIDE - P;
        float w[KK], dw[KK];
#pragma unroll
        for (int a = 0; a < K; ++a) {
#pragma unroll
            for (int bb = 0; bb < K; ++bb) {
                const bool ok = active && top + a >= 0 && top + a < H && left + bb >= 0 &&
                                left + bb < W;
                const float l = lr_phi(comp, qv, s_k[base + a * PW + bb]) + s_geo[a * K + bb];
                w[a * K + bb] = ok ? expf(l - lse_v) : 0.0f;
                dw[a * K + bb] = 0.0f;
            }
        }
        const long long c_end = g * m + m < C ? g * m + m : C;
        for (long long c = g * m; c < c_end; ++c) {
            __syncthreads();
            lr_load_tile<IH, IW, PW>(s_x, x + (b * C + c) * H * W, r0, c0, H, W, tid);
            __syncthreads();
            const float gyv = active ? lr_load(gy, ((b * C + c) * Ho + i) * Wo + j) : 0.0f;
#pragma unroll
            for (int a = 0; a < K; ++a) {
#pragma unroll
                for (int bb = 0; bb < K; ++bb) dw[a * K + bb] += gyv * s_x[base + a * PW + bb];
            }
        }
        float dot = 0.0f;
#pragma unroll
        for (int o = 0; o < KK; ++o) dot += w[o] * dw[o];
        float gqv = 0.0f;
#pragma unroll
        for (int a = 0; a < K; ++a) {
#pragma unroll
            for (int bb = 0; bb < K; ++bb) {
                const int o = a * K + bb;
                const float dl = w[o] * (dw[o] - dot);
                gqv += dl * lr_dphi_dq(comp, qv, s_k[base + a * PW + bb]);
                gacc[o] += dl;
            }
        }
        if (active) {
            dsum[qidx] = dot;
            lr_store(gq, qidx, gqv);
        }
    }

    // block reduction of gacc in a fixed order, RC offsets at a time: every thread stores its
    // RC values, 16 threads per offset sum 8 each, then one thread per offset sums those 16
    constexpr int RC = LR_THREADS / 16;
#pragma unroll
    for (int o0 = 0; o0 < KK; o0 += RC) {
        __syncthreads();  // the previous round's s_part readers are done
#pragma unroll
        for (int r = 0; r < RC; ++r) {
            if (o0 + r < KK) s_red[r * LR_THREADS + tid] = gacc[o0 + r];
        }
        __syncthreads();
        {
            const int r = tid / 16, part = tid % 16;
            float v = 0.0f;
            for (int e = 0; e < LR_THREADS / 16; ++e) {
                v += s_red[r * LR_THREADS + part * (LR_THREADS / 16) + e];
            }
            s_part[r * 16 + part] = v;
        }
        __syncthreads();
        if (tid < RC && o0 + tid < KK) {
            float v = 0.0f;
            for (int p = 0; p < 16; ++p) v += s_part[tid * 16 + p];
            geo_partial[(g * KK + o0 + tid) * nchunks + chunk] = v;
        }
    }
}

// Backward, input side: one thread per input position (h, w) of a tile of one (b, g) plane. It
// gathers grad x for the channels of group g at (h, w) and grad k at (b, g, h, w) from the
// (at most NC x NC) outputs whose window covers (h, w). Shared: q, lse and D over the outputs
// covering the tile, and gy of each channel over the same outputs.
template <typename T, int K, int STRIDE>
__global__ void lr_backward_input(const T* __restrict__ x, const T* __restrict__ q,
                      const T* __restrict__ k, const float* __restrict__ geo,
                      const float* __restrict__ lse, const float* __restrict__ dsum,
                      const T* __restrict__ gy, T* __restrict__ gx, T* __restrict__ gk,
                      long long B, long long C, long long H, long long W, long long G,
                      long long m, long long Ho, long long Wo, int comp) {
    constexpr int P = K / 2;
    constexpr int KK = K * K;
    constexpr int NC = (K - 1) / STRIDE + 1;  // most outputs covering an input, per axis
    // output rows / columns staged per tile: i_first of the tile's last row is at most
    // ceil((LR_TILE_H - 1) / STRIDE) past the first row's, and each row reads NC of them
    constexpr int OH = (LR_TILE_H + STRIDE - 2) / STRIDE + NC;
    constexpr int OW = (LR_TILE_W + STRIDE - 2) / STRIDE + NC;
    constexpr int PO = lr_pitch<OW, STRIDE>();  // row pitch of the shared tiles
    LR_SHARED(float, s_q, OH * PO);
    LR_SHARED(float, s_lse, OH * PO);
    LR_SHARED(float, s_d, OH * PO);
    LR_SHARED(float, s_gy, OH * PO);
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
        __syncthreads();

        // the outputs covering (h, wc): i = i_first + ti, j = j_first + tj, ti, tj in [0, NC)
        const long long i_first = lr_floor_div(h + P - K + STRIDE, STRIDE);
        const long long j_first = lr_floor_div(wc + P - K + STRIDE, STRIDE);
        const int sbase = (int)((i_first - oi0) * PO + (j_first - oj0));
        const float kv = active ? lr_load(k, ((b * G + g) * H + h) * W + wc) : 0.0f;
        float wv[NC * NC], wdk[NC * NC];
        float gk_acc = 0.0f;
#pragma unroll
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
                wv[ti * NC + tj] = wt;
                wdk[ti * NC + tj] = wt * lr_dphi_dk(comp, qv, kv);
                gk_acc -= wdk[ti * NC + tj] * s_d[ok ? s : 0];
            }
        }
        const long long c_end = g * m + m < C ? g * m + m : C;
        for (long long c = g * m; c < c_end; ++c) {
            __syncthreads();
            lr_load_tile<OH, OW, PO>(s_gy, gy + (b * C + c) * Ho * Wo, oi0, oj0, Ho, Wo, tid);
            __syncthreads();
            float gxv = 0.0f, gkc = 0.0f;
#pragma unroll
            for (int ti = 0; ti < NC; ++ti) {
#pragma unroll
                for (int tj = 0; tj < NC; ++tj) {
                    const float v = s_gy[sbase + ti * PO + tj];
                    gxv += wv[ti * NC + tj] * v;
                    gkc += wdk[ti * NC + tj] * v;
                }
            }
            if (active) {
                const long long xidx = ((b * C + c) * H + h) * W + wc;
                gk_acc += lr_load(x, xidx) * gkc;
                lr_store(gx, xidx, gxv);
            }
        }
        if (active) lr_store(gk, ((b * G + g) * H + h) * W + wc, gk_acc);
    }
}
