// A CUDA execution emulator for the CPU, so that the unchanged kernels of kernels/*.cu compile
// with g++ and run in the tests (tests/host_shim/host_launchers.cpp, host_launcher.py).
//
// Execution model, as on a GPU as far as a correct kernel can tell, and made to show what a GPU
// would show of an incorrect one:
// - every CUDA thread of a block runs as its own std::thread (threadIdx is thread_local);
//   LR_EMU_CONCURRENT_BLOCKS blocks of a launch run at the same time, each on its own set of
//   threads ("slot" s runs blocks s, s + LR_EMU_CONCURRENT_BLOCKS, ...), with no ordering between
//   slots, so ThreadSanitizer sees two blocks writing one global element as a data race;
// - __syncthreads() is a real barrier of the block's threads (threads that returned early
//   leave the barrier, as exited threads do on the GPU);
// - shared arrays are declared with LR_SHARED(T, name, count) (lr_common.cuh; on the GPU a
//   plain `__shared__ T name[count]`); here each is an exactly sized heap buffer per slot, the
//   same for every thread of the block (declarations run in the same order in every thread),
//   filled with 0xff bytes (a NaN as fp32) at the start of every block, so a read of a slot the
//   block did not write gives NaN, as a GPU gives whatever the previous block left; more than
//   48 KB of them per block aborts (CUDA's static limit); raw __shared__ does not compile here;
//   dynamic shared memory (LR_DYNAMIC_SHARED, the portable spelling of
//   `extern __shared__ T name[]`) is an exactly sized heap buffer per slot, poisoned likewise;
// - a vector load (lr_read_vec of lr_common.cuh: LDS.64 / LDS.128 on the GPU) from an address
//   that is not a multiple of its width aborts, as a GPU faults (misaligned address);
// - asynchronous copies global -> shared (lr_copy_async of lr_common.cuh, cp.async on sm_80+)
//   are queued per thread and land only at the thread's next lr_copy_wait (cp.async.wait_all):
//   a tile read without that wait reads the poison; copies still queued when a block ends are
//   dropped (LR_EMU_ASYNC_COPY tells lr_common.cuh to take this path);
// - warps are groups of 32 consecutive threads; __shfl_*_sync, __ballot_sync, __any_sync,
//   __all_sync and __syncwarp exchange values through a per-warp slot array between two
//   warp barriers; all lanes named in the mask must take part;
// - atomics are GCC __atomic builtins (seen by ThreadSanitizer);
// - floating point: every emulated thread sets FTZ and DAZ in MXCSR, mirroring the
//   -ftz=true that CuPy passes to NVRTC.
// Because the threads really run concurrently, ThreadSanitizer sees a missing __syncthreads as a
// data race, and AddressSanitizer sees an out-of-bounds access of a kernel argument (the host
// launcher copies every argument into an exactly sized heap buffer) or of a shared array.
#pragma once

#include <math.h>  // expf, logf, fabsf, fmaxf in the global namespace, as on the device
#include <xmmintrin.h>

#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define LR_SHARED(T, name, count) T* const name = lr_emu::shared_array<T>(count)
#define LR_SHARED_VECTORS(T, name, count) LR_SHARED(T, name, count)
#define LR_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(lr_emu::dynamic_shared())
#define LR_EMU_ASYNC_COPY 1
#define LR_EMU_CHECK_ALIGNMENT(p, bytes) lr_emu::check_alignment(p, bytes)

#ifndef LR_EMU_CONCURRENT_BLOCKS
#define LR_EMU_CONCURRENT_BLOCKS 2
#endif

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace lr_emu {

// A reusable barrier whose participants may leave (drop) for the rest of a phase.
class Barrier {
   public:
    void reset(int n) {
        std::lock_guard<std::mutex> lock(mu_);
        expected_ = n;
        arrived_ = 0;
    }
    void arrive_and_wait() {
        std::unique_lock<std::mutex> lock(mu_);
        const unsigned long long gen = generation_;
        if (++arrived_ >= expected_) {
            release();
        } else {
            cv_.wait(lock, [&] { return generation_ != gen; });
        }
    }
    void arrive_and_drop() {
        std::lock_guard<std::mutex> lock(mu_);
        --expected_;
        if (expected_ > 0 && arrived_ >= expected_) release();
    }

   private:
    void release() {
        arrived_ = 0;
        ++generation_;
        cv_.notify_all();
    }
    std::mutex mu_;
    std::condition_variable cv_;
    int expected_ = 0;
    int arrived_ = 0;
    unsigned long long generation_ = 0;
};

struct Warp {
    Barrier barrier;
    unsigned long long slots[32];
};

//: Static shared memory one block may declare (CUDA's limit without an opt-in attribute).
constexpr std::size_t kMaxStaticShared = 48 * 1024;
//: The byte every shared array is filled with at the start of a block: 0xffffffff is a NaN.
constexpr int kPoison = 0xff;

// One slot: the threads of one running block, its barriers and its shared memory.
struct BlockState {
    Barrier block;
    std::vector<Warp> warps;
    void* dynamic_shared = nullptr;
    std::size_t dynamic_bytes = 0;
    std::mutex shared_mu;
    std::vector<std::pair<void*, std::size_t>> shared;  // LR_SHARED arrays in declaration order

    // At the start of a block (one thread, the others waiting): every shared byte poisoned.
    void poison() {
        for (auto& a : shared) std::memset(a.first, kPoison, a.second);
        if (dynamic_shared) std::memset(dynamic_shared, kPoison, dynamic_bytes);
    }
    ~BlockState() {
        for (auto& a : shared) std::free(a.first);
        std::free(dynamic_shared);
    }
};

inline thread_local BlockState* current = nullptr;
inline thread_local int linear_tid = 0;
inline thread_local std::size_t shared_declared = 0;  // LR_SHARED arrays this thread has passed

inline void* dynamic_shared() { return current->dynamic_shared; }

// This thread's asynchronous copies not yet waited for: destination and source (nullptr: zero).
struct PendingCopy {
    float* dst;
    const float* src;
};
inline thread_local std::vector<PendingCopy> pending_copies;

inline void copy_async(float* dst, const float* src) { pending_copies.push_back({dst, src}); }

inline void copy_wait() {
    for (const PendingCopy& c : pending_copies) *c.dst = c.src ? *c.src : 0.0f;
    pending_copies.clear();
}

// The next LR_SHARED array of this thread's block: the first thread to declare it allocates it
// (exactly sized, poisoned); the others get the same buffer.
template <typename T>
T* shared_array(std::size_t count) {
    BlockState& st = *current;
    const std::size_t bytes = count * sizeof(T);
    std::lock_guard<std::mutex> lock(st.shared_mu);
    const std::size_t i = shared_declared++;
    if (i == st.shared.size()) {
        std::size_t total = bytes;
        for (auto& a : st.shared) total += a.second;
        if (total > kMaxStaticShared) {
            std::fprintf(stderr, "lr_emu: %zu bytes of static shared memory (limit %zu)\n", total,
                         kMaxStaticShared);
            std::abort();
        }
        void* p = std::malloc(bytes ? bytes : 1);
        std::memset(p, kPoison, bytes);
        st.shared.emplace_back(p, bytes);
    } else if (i > st.shared.size() || st.shared[i].second != bytes) {
        std::fprintf(stderr, "lr_emu: shared arrays declared differently by the threads\n");
        std::abort();
    }
    return static_cast<T*>(st.shared[i].first);
}

// A vector load of `bytes` at p: p must be a multiple of `bytes` (a GPU faults otherwise).
inline void check_alignment(const void* p, std::size_t bytes) {
    if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
        std::fprintf(stderr, "lr_emu: misaligned %zu-byte vector load at %p\n", bytes, p);
        std::abort();
    }
}

inline int lane() { return linear_tid % 32; }
inline Warp& warp() { return current->warps[linear_tid / 32]; }

template <typename V>
unsigned long long to_bits(V v) {
    static_assert(sizeof(V) <= 8, "warp exchange of values up to 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    return bits;
}

template <typename V>
V from_bits(unsigned long long bits) {
    V v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

inline void check_mask(unsigned mask) {
    if (!((mask >> lane()) & 1u)) std::abort();  // a lane calling with a mask that excludes it
}

// Every lane publishes `v`, then reads the slot of lane `src(lane)`.
template <typename V, typename Src>
V exchange(unsigned mask, V v, Src src) {
    check_mask(mask);
    Warp& w = warp();
    w.slots[lane()] = to_bits(v);
    w.barrier.arrive_and_wait();
    const int s = src(lane());
    const V out = from_bits<V>(w.slots[s]);
    w.barrier.arrive_and_wait();
    return out;
}

// Run `body` (one kernel invocation) for every thread of every block of the grid, with
// LR_EMU_CONCURRENT_BLOCKS blocks running at a time (see the top of this file).
template <typename Body>
void launch(dim3 grid, dim3 block, std::size_t dynamic_bytes, Body body) {
    const int nthreads = static_cast<int>(block.x * block.y * block.z);
    const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
    const int nslots = static_cast<int>(
        nblocks < LR_EMU_CONCURRENT_BLOCKS ? nblocks : LR_EMU_CONCURRENT_BLOCKS);
    struct Slot {
        BlockState state;
        Barrier end_of_block, start_of_block;
    };
    std::vector<Slot> slots(nslots);
    for (Slot& slot : slots) {
        slot.state.warps = std::vector<Warp>((nthreads + 31) / 32);
        slot.state.dynamic_bytes = dynamic_bytes;
        slot.state.dynamic_shared = dynamic_bytes ? std::malloc(dynamic_bytes) : nullptr;
        slot.end_of_block.reset(nthreads);
        slot.start_of_block.reset(nthreads);
    }
    auto reset_block = [&](BlockState& state) {
        state.block.reset(nthreads);
        for (std::size_t w = 0; w < state.warps.size(); ++w) {
            const int lanes = nthreads - static_cast<int>(w) * 32;
            state.warps[w].barrier.reset(lanes < 32 ? lanes : 32);
        }
        state.poison();
    };
    for (Slot& slot : slots) reset_block(slot.state);

    auto thread_main = [&](int s, int t) {
        _mm_setcsr(_mm_getcsr() | 0x8040u);  // flush-to-zero and denormals-are-zero
        Slot& slot = slots[s];
        current = &slot.state;
        linear_tid = t;
        blockDim = block;
        gridDim = grid;
        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        for (unsigned long long b = s; b < nblocks; b += nslots) {
            blockIdx = {static_cast<unsigned>(b % grid.x),
                        static_cast<unsigned>((b / grid.x) % grid.y),
                        static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
            shared_declared = 0;
            body();
            pending_copies.clear();  // never waited for: they do not land
            // a finished thread leaves its block's and its warp's barriers for this block
            slot.state.block.arrive_and_drop();
            warp().barrier.arrive_and_drop();
            slot.end_of_block.arrive_and_wait();
            if (t == 0) reset_block(slot.state);
            slot.start_of_block.arrive_and_wait();
        }
        current = nullptr;
    };
    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(nslots) * nthreads);
    for (int s = 0; s < nslots; ++s) {
        for (int t = 0; t < nthreads; ++t) threads.emplace_back(thread_main, s, t);
    }
    for (auto& th : threads) th.join();
}

}  // namespace lr_emu

// ---- CUDA built-ins used by kernels ---------------------------------------------------------

inline void __syncthreads() { lr_emu::current->block.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    lr_emu::check_mask(mask);
    lr_emu::warp().barrier.arrive_and_wait();
}

template <typename V>
V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
    return lr_emu::exchange(mask, v, [=](int l) { return (l / width) * width + src % width; });
}
template <typename V>
V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32) {
    return lr_emu::exchange(mask, v, [=](int l) {
        const int s = l + static_cast<int>(delta);
        return s / width == l / width ? s : l;
    });
}
template <typename V>
V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = 32) {
    return lr_emu::exchange(mask, v, [=](int l) {
        const int s = l - static_cast<int>(delta);
        return s >= (l / width) * width ? s : l;
    });
}
template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
    return lr_emu::exchange(mask, v, [=](int l) {
        const int s = l ^ lane_mask;
        return s / width == l / width ? s : l;
    });
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    lr_emu::check_mask(mask);
    lr_emu::Warp& w = lr_emu::warp();
    w.slots[lr_emu::lane()] = predicate ? 1u : 0u;
    w.barrier.arrive_and_wait();
    unsigned out = 0;
    for (int l = 0; l < 32; ++l) {
        if (((mask >> l) & 1u) && w.slots[l]) out |= 1u << l;
    }
    w.barrier.arrive_and_wait();
    return out;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
    return __ballot_sync(mask, predicate) == (mask & __ballot_sync(mask, 1));
}

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* p, float v) {
    unsigned* u = reinterpret_cast<unsigned*>(p);
    unsigned old = __atomic_load_n(u, __ATOMIC_RELAXED);
    for (;;) {
        float f;
        std::memcpy(&f, &old, sizeof f);
        f += v;
        unsigned next;
        std::memcpy(&next, &f, sizeof next);
        if (__atomic_compare_exchange_n(u, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            float prev;
            std::memcpy(&prev, &old, sizeof prev);
            return prev;
        }
    }
}
inline int atomicMax(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v &&
           !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

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
inline float __expf(float v) { return expf(v); }
inline float __logf(float v) { return logf(v); }
inline float __fdividef(float a, float b) { return a / b; }
template <typename V>
V __ldg(const V* p) {
    return *p;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
