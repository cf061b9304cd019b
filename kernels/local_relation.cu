// Local relation op, simple CUDA kernels (DESIGN.md §1): one thread per output (forward) or per
// input / query position (backward), no shared memory and no __syncthreads, so that the same
// source also compiles on the CPU with g++ through tests/host_shim/cuda_host_shim.h and is tested
// there against a float64 reference.
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
// Backward (w = softmax weights of one (b, g, i, j), gy = grad of y):
//   dw_o = sum_{c in g} gy_c x_{o,c},  D = sum_o w_o dw_o (= sum_c gy_c y_c),
//   dlogit_o = w_o (dw_o - D).
// lr_backward_query owns the query positions: it writes grad q, D (for the second kernel) and
// per-thread partial sums of grad geo (reduced afterwards, deterministically, by the caller).
// lr_backward_input owns the input positions: it gathers grad x and grad k from the outputs
// whose window covers them, recomputing the weights from the saved lse. No atomics anywhere.
#include "lr_common.cuh"

#define LR_GRID_STRIDE_LOOP(idx, total)                                                 \
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < (total); \
         idx += (long long)blockDim.x * gridDim.x)

// Forward, fused: logits, softmax and aggregation for one (b, g, i, j) per thread.
template <typename T, int K, int STRIDE>
__global__ void lr_forward(const T* __restrict__ x, const T* __restrict__ q,
                           const T* __restrict__ k, const float* __restrict__ geo,
                           T* __restrict__ y, float* __restrict__ lse, long long B, long long C,
                           long long H, long long W, long long G, long long m, long long Ho,
                           long long Wo, int comp) {
    constexpr int P = K / 2;
    constexpr int KK = K * K;
    const long long total = B * G * Ho * Wo;
    LR_GRID_STRIDE_LOOP(idx, total) {
        const long long j = idx % Wo;
        const long long i = (idx / Wo) % Ho;
        const long long g = (idx / (Wo * Ho)) % G;
        const long long b = idx / (Wo * Ho * G);
        int a_lo, a_hi, b_lo, b_hi;
        lr_window_range(i, STRIDE, P, K, H, &a_lo, &a_hi);
        lr_window_range(j, STRIDE, P, K, W, &b_lo, &b_hi);
        const long long r0 = i * STRIDE - P;
        const long long c0 = j * STRIDE - P;
        const float qv = lr_load(q, idx);
        const long long kbase = (b * G + g) * H * W;
        const float* geo_g = geo + g * KK;

        // logits and their maximum (the centre is always in the image, so the window is
        // never empty)
        float w[KK];
        float peak = -3.0e38f;
        for (int a = a_lo; a < a_hi; ++a) {
            for (int bb = b_lo; bb < b_hi; ++bb) {
                const float kv = lr_load(k, kbase + (r0 + a) * W + (c0 + bb));
                const float l = lr_phi(comp, qv, kv) + geo_g[a * K + bb];
                w[a * K + bb] = l;
                peak = fmaxf(peak, l);
            }
        }
        float sum = 0.0f;
        for (int a = a_lo; a < a_hi; ++a) {
            for (int bb = b_lo; bb < b_hi; ++bb) {
                const float e = expf(w[a * K + bb] - peak);
                w[a * K + bb] = e;
                sum += e;
            }
        }
        lse[idx] = peak + logf(sum);
        const float inv = 1.0f / sum;

        // aggregation over the channels of group g
        const long long c_begin = g * m;
        const long long c_end = c_begin + m < C ? c_begin + m : C;
        for (long long c = c_begin; c < c_end; ++c) {
            const long long xbase = (b * C + c) * H * W;
            float acc = 0.0f;
            for (int a = a_lo; a < a_hi; ++a) {
                for (int bb = b_lo; bb < b_hi; ++bb) {
                    acc += w[a * K + bb] * lr_load(x, xbase + (r0 + a) * W + (c0 + bb));
                }
            }
            lr_store(y, ((b * C + c) * Ho + i) * Wo + j, acc * inv);
        }
    }
}

// Backward, query side. Thread t of group g (idx = g * nchunks + t) owns the query positions
// pos = t, t + nchunks, ... of the flattened (b, i, j) of that group. It writes grad_q and
// dsum = D at those positions, and its partial sums of grad geo to
// geo_partial[(g * K * K + o) * nchunks + t], which the caller sums over t.
template <typename T, int K, int STRIDE>
__global__ void lr_backward_query(const T* __restrict__ x, const T* __restrict__ q,
                                  const T* __restrict__ k, const float* __restrict__ geo,
                                  const float* __restrict__ lse, const T* __restrict__ gy,
                                  T* __restrict__ gq, float* __restrict__ dsum,
                                  float* __restrict__ geo_partial, long long B, long long C,
                                  long long H, long long W, long long G, long long m,
                                  long long Ho, long long Wo, long long nchunks, int comp) {
    constexpr int P = K / 2;
    constexpr int KK = K * K;
    const long long total = G * nchunks;
    const long long npos = B * Ho * Wo;
    LR_GRID_STRIDE_LOOP(idx, total) {
        const long long g = idx / nchunks;
        const long long t = idx % nchunks;
        const float* geo_g = geo + g * KK;
        float gacc[KK];
        for (int o = 0; o < KK; ++o) gacc[o] = 0.0f;

        for (long long pos = t; pos < npos; pos += nchunks) {
            const long long j = pos % Wo;
            const long long i = (pos / Wo) % Ho;
            const long long b = pos / (Wo * Ho);
            const long long qidx = ((b * G + g) * Ho + i) * Wo + j;
            int a_lo, a_hi, b_lo, b_hi;
            lr_window_range(i, STRIDE, P, K, H, &a_lo, &a_hi);
            lr_window_range(j, STRIDE, P, K, W, &b_lo, &b_hi);
            const long long r0 = i * STRIDE - P;
            const long long c0 = j * STRIDE - P;
            const long long kbase = (b * G + g) * H * W;
            const float qv = lr_load(q, qidx);
            const float lse_v = lse[qidx];

            float w[KK], dw[KK], kv[KK];
            for (int a = a_lo; a < a_hi; ++a) {
                for (int bb = b_lo; bb < b_hi; ++bb) {
                    const int o = a * K + bb;
                    kv[o] = lr_load(k, kbase + (r0 + a) * W + (c0 + bb));
                    w[o] = expf(lr_phi(comp, qv, kv[o]) + geo_g[o] - lse_v);
                    dw[o] = 0.0f;
                }
            }
            const long long c_begin = g * m;
            const long long c_end = c_begin + m < C ? c_begin + m : C;
            for (long long c = c_begin; c < c_end; ++c) {
                const float gyv = lr_load(gy, ((b * C + c) * Ho + i) * Wo + j);
                const long long xbase = (b * C + c) * H * W;
                for (int a = a_lo; a < a_hi; ++a) {
                    for (int bb = b_lo; bb < b_hi; ++bb) {
                        dw[a * K + bb] += gyv * lr_load(x, xbase + (r0 + a) * W + (c0 + bb));
                    }
                }
            }
            float dot = 0.0f;
            for (int a = a_lo; a < a_hi; ++a) {
                for (int bb = b_lo; bb < b_hi; ++bb) dot += w[a * K + bb] * dw[a * K + bb];
            }
            dsum[qidx] = dot;
            float gqv = 0.0f;
            for (int a = a_lo; a < a_hi; ++a) {
                for (int bb = b_lo; bb < b_hi; ++bb) {
                    const int o = a * K + bb;
                    const float dl = w[o] * (dw[o] - dot);
                    gqv += dl * lr_dphi_dq(comp, qv, kv[o]);
                    gacc[o] += dl;
                }
            }
            lr_store(gq, qidx, gqv);
        }
        for (int o = 0; o < KK; ++o) geo_partial[(g * KK + o) * nchunks + t] = gacc[o];
    }
}

// Backward, input side: one thread per (b, g, h, w). It gathers grad x for the channels of
// group g at (h, w) and grad k at (b, g, h, w) from every output whose window covers (h, w),
// using lse (forward) and dsum (lr_backward_query) of those outputs.
template <typename T, int K, int STRIDE>
__global__ void lr_backward_input(const T* __restrict__ x, const T* __restrict__ q,
                                  const T* __restrict__ k, const float* __restrict__ geo,
                                  const float* __restrict__ lse, const float* __restrict__ dsum,
                                  const T* __restrict__ gy, T* __restrict__ gx,
                                  T* __restrict__ gk, long long B, long long C, long long H,
                                  long long W, long long G, long long m, long long Ho,
                                  long long Wo, int comp) {
    constexpr int P = K / 2;
    constexpr int KK = K * K;
    constexpr int NC = (K - 1) / STRIDE + 1;  // most outputs covering an input, per axis
    const long long total = B * G * H * W;
    LR_GRID_STRIDE_LOOP(idx, total) {
        const long long wc = idx % W;
        const long long h = (idx / W) % H;
        const long long g = (idx / (W * H)) % G;
        const long long b = idx / (W * H * G);
        long long i_lo, i_hi, j_lo, j_hi;
        lr_cover_range(h, STRIDE, P, K, Ho, &i_lo, &i_hi);
        lr_cover_range(wc, STRIDE, P, K, Wo, &j_lo, &j_hi);
        const float kv = lr_load(k, idx);
        const float* geo_g = geo + g * KK;

        float wv[NC * NC], dwv[NC * NC], dk[NC * NC], dot[NC * NC];
        long long opos[NC * NC];
        int n = 0;
        for (long long i = i_lo; i < i_hi; ++i) {
            const int a = (int)(h + P - i * STRIDE);
            for (long long j = j_lo; j < j_hi; ++j) {
                const int bb = (int)(wc + P - j * STRIDE);
                const long long qidx = ((b * G + g) * Ho + i) * Wo + j;
                const float qv = lr_load(q, qidx);
                wv[n] = expf(lr_phi(comp, qv, kv) + geo_g[a * K + bb] - lse[qidx]);
                dk[n] = lr_dphi_dk(comp, qv, kv);
                dot[n] = dsum[qidx];
                dwv[n] = 0.0f;
                opos[n] = i * Wo + j;
                ++n;
            }
        }
        const long long c_begin = g * m;
        const long long c_end = c_begin + m < C ? c_begin + m : C;
        for (long long c = c_begin; c < c_end; ++c) {
            const long long xidx = ((b * C + c) * H + h) * W + wc;
            const long long gybase = (b * C + c) * Ho * Wo;
            const float xv = lr_load(x, xidx);
            float acc = 0.0f;
            for (int t = 0; t < n; ++t) {
                const float gyv = lr_load(gy, gybase + opos[t]);
                acc += wv[t] * gyv;
                dwv[t] += gyv * xv;
            }
            lr_store(gx, xidx, acc);
        }
        float gkv = 0.0f;
        for (int t = 0; t < n; ++t) gkv += wv[t] * (dwv[t] - dot[t]) * dk[t];
        lr_store(gk, idx, gkv);
    }
}
