// Kernels with deliberate bugs, built into the sanitizer variants of the host library only, to
// show that the sanitizers fire (tests/test_kernels_emulator.py), plus their correct twins and a
// warp-intrinsics check.

// Reads one element past the end of `in` (n elements) in the last thread.
__global__ void lr_read_past_end(const float* __restrict__ in, float* __restrict__ out,
                                 long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i + (i == n - 1 ? 1 : 0)];
}

// Copies `in` to `out` (n elements) and writes one element past the end of `out` in the last
// thread (the guard of the builds without AddressSanitizer sees it).
__global__ void lr_write_past_end(const float* __restrict__ in, float* __restrict__ out,
                                  long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i + (i == n - 1 ? 1 : 0)] = in[i];
}

// Reverses `in` within each block through shared memory; without the barrier a thread reads a
// slot another thread has not written yet (a data race).
__global__ void lr_missing_sync(const float* __restrict__ in, float* __restrict__ out) {
    LR_SHARED(float, tile, 64);
    const int t = threadIdx.x;
    tile[t] = in[blockIdx.x * blockDim.x + t];
    out[blockIdx.x * blockDim.x + t] = tile[blockDim.x - 1 - t];
}

__global__ void lr_with_sync(const float* __restrict__ in, float* __restrict__ out) {
    LR_SHARED(float, tile, 64);
    const int t = threadIdx.x;
    tile[t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = tile[blockDim.x - 1 - t];
}

// Per warp: a shfl_xor sum, shfl_down sum, lane 3's value, ballot of (v > 0), any / all, and an
// atomicAdd of every value into out[5] and a dynamic-shared-memory round trip into out[6].
__global__ void lr_warp_ops(const float* __restrict__ in, float* __restrict__ out) {
    LR_DYNAMIC_SHARED(float, dyn);
    const int t = threadIdx.x;
    const float v = in[t];
    dyn[t] = v;
    __syncthreads();
    float xs = v, ds = v;
    for (int o = 16; o > 0; o >>= 1) {
        xs += __shfl_xor_sync(0xffffffffu, xs, o);
        ds += __shfl_down_sync(0xffffffffu, ds, o);
    }
    const float l3 = __shfl_sync(0xffffffffu, v, 3);
    const unsigned bal = __ballot_sync(0xffffffffu, v > 0.0f);
    const int any = __any_sync(0xffffffffu, v > 100.0f);
    const int all = __all_sync(0xffffffffu, v > -100.0f);
    atomicAdd(out + 5, v);
    if ((t & 31) == 0) {
        const int w = t / 32;
        out[8 + 8 * w + 0] = xs;
        out[8 + 8 * w + 1] = ds;
        out[8 + 8 * w + 2] = l3;
        out[8 + 8 * w + 3] = (float)(bal & 0xffffu);  // exact in fp32
        out[8 + 8 * w + 7] = (float)(bal >> 16);
        out[8 + 8 * w + 4] = (float)any;
        out[8 + 8 * w + 5] = (float)all;
        out[8 + 8 * w + 6] = dyn[(t + 33) % blockDim.x];
    }
}

// Reverses `in` within each block through shared memory but never loads the block's last slot:
// the thread reading it gets whatever the shared memory held (on a GPU the previous block's
// data; in the emulator the poison, a NaN, at every block start).
__global__ void lr_unloaded_slot(const float* __restrict__ in, float* __restrict__ out) {
    LR_SHARED(float, tile, 64);
    const int t = threadIdx.x;
    if (t < (int)blockDim.x - 1) tile[t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = tile[blockDim.x - 1 - t];
}

// Thread 0 of every block increments out[0] without an atomic: a race between blocks.
__global__ void lr_block_race(float* __restrict__ out) {
    if (threadIdx.x == 0) out[0] += 1.0f;
}

// Its correct twin: every block increments its own element.
__global__ void lr_block_own(float* __restrict__ out) {
    if (threadIdx.x == 0) out[blockIdx.x] += 1.0f;
}

// Reverses `in` within each block through shared memory filled by asynchronous copies
// (lr_copy_async, cp.async on sm_80+), but reads the tile without waiting for them: on a GPU
// the reads may see the slots before the copies land; in the emulator they see the poison.
__global__ void lr_copy_unwaited(const float* __restrict__ in, float* __restrict__ out) {
    LR_SHARED(float, tile, 64);
    const int t = threadIdx.x;
    lr_copy_async(tile, t, in + blockIdx.x * blockDim.x + t, true);
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = tile[blockDim.x - 1 - t];
}

// Its correct twin: every thread waits for its copy before the barrier; the last thread's copy
// is a zero fill (its source is not read).
__global__ void lr_copy_waited(const float* __restrict__ in, float* __restrict__ out) {
    LR_SHARED(float, tile, 64);
    const int t = threadIdx.x;
    const bool inside = t < (int)blockDim.x - 1;
    lr_copy_async(tile, t, inside ? in + blockIdx.x * blockDim.x + t : nullptr, inside);
    lr_copy_wait();
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = tile[blockDim.x - 1 - t];
}

// Reads `in` back through shared memory 4 words at a time (lr_read_vec<4>, LDS.128 on the GPU),
// each thread's quad starting `shift` words into the tile: at a shift that is not a multiple of
// 4 the load is misaligned (a GPU faults; the emulator aborts).
__global__ void lr_vector_read(const float* __restrict__ in, float* __restrict__ out, int shift) {
    LR_SHARED_VECTORS(float, tile, 68);
    const int t = threadIdx.x;
    tile[t] = in[blockIdx.x * blockDim.x + t];
    if (t < 4) tile[64 + t] = 0.0f;
    __syncthreads();
    if (t < 16) {
        float quad[4];
        lr_read_vec<4>(tile + shift, t, quad);
        for (int e = 0; e < 4; ++e) out[blockIdx.x * blockDim.x + 4 * t + e] = quad[e];
    }
}
