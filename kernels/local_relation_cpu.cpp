// Fused CPU kernels of the local relation op (DESIGN.md §1), loaded by robustlr/ops/cpu_backend.py.
//
// Plain C++ with OpenMP, no PyTorch headers (so the one-off JIT build takes seconds): Python
// hands contiguous NCHW buffers over as raw pointers (ctypes). Semantics equal the reference
// backend: channel c uses group g = c / m; output (i, j) reads input (i*s - P + a, j*s - P + b)
// for the in-image offsets (a, b) of the K x K window only (softmax over those); logits are
// phi(q, k) + geo[g, a, b] with phi = -(q-k)^2, -|q-k| or q*k.
//
// Both passes are parallel over (batch, group) pairs and keep one output plane's logits over
// the window in a per-thread K*K*Ho*Wo buffer (for the softmax of each position; no K*K-sized
// tensor is ever allocated). Forward: logits, max, exp-sum (log-sum-exp saved per position),
// then the group's m channels aggregated four at a time. Backward recomputes the weights from
// the log-sum-exp and uses D = sum_c gy_c y_c; each (b, g) owns its m channels of grad x, its
// own channel of grad q and grad k, and a private K*K slot of grad geo partials (summed over
// the batch by the caller), so no two threads write the same element and the results are
// deterministic. Every inner loop runs over flat output positions (see the layout note in
// local_relation_cpu_impl.h), so the compiler vectorises it.

// Vector width: the kernels (local_relation_cpu_impl.h) are compiled twice, for the baseline
// instruction set of the compiler's target and, on x86-64, for AVX2 + FMA; the AVX2 copy runs
// where the CPU has those (checked at run time), so no -march flag is needed at build time.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// Sizes of one call (DESIGN.md §1): batch, channels, height, width, groups, channels per group,
// output height and width, kernel size, stride.
struct Dims {
  int64_t B, C, H, W, G, m, Ho, Wo, K, s;
};

namespace lr_generic {
#include "local_relation_cpu_impl.h"
}  // namespace lr_generic

#if defined(__x86_64__) && defined(__GNUC__)
#define LR_HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace lr_avx2 {
#include "local_relation_cpu_impl.h"
}  // namespace lr_avx2
#pragma GCC pop_options
#endif

namespace {

bool use_avx2() {
#ifdef LR_HAVE_AVX2_COPY
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace

// dims: B, C, H, W, G, m, Ho, Wo, K, s (10 int64). Outputs y (B, C, Ho, Wo), lse (B, G, Ho, Wo).
// Backward outputs gx, gq, gk must be zero-filled; ggeo_part (B, G, K, K) is overwritten.
extern "C" {

int lr_cpu_abi_version() { return 1; }

// 1 when the AVX2 + FMA copy of the kernels runs on this CPU, else 0.
int lr_cpu_uses_avx2() { return use_avx2() ? 1 : 0; }

#ifdef LR_HAVE_AVX2_COPY
#define LR_DISPATCH(fn) (use_avx2() ? lr_avx2::fn : lr_generic::fn)
#else
#define LR_DISPATCH(fn) lr_generic::fn
#endif
#define LR_DIMS(p) Dims{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]}

void lr_forward_f32(const int64_t* dims, int comp, const float* x, const float* q,
                    const float* k, const float* geo, float* y, float* lse, int nthreads) {
  LR_DISPATCH(forward_any<float>)(LR_DIMS(dims), comp, x, q, k, geo, y, lse, nthreads);
}

void lr_forward_f64(const int64_t* dims, int comp, const double* x, const double* q,
                    const double* k, const double* geo, double* y, double* lse, int nthreads) {
  LR_DISPATCH(forward_any<double>)(LR_DIMS(dims), comp, x, q, k, geo, y, lse, nthreads);
}

void lr_backward_f32(const int64_t* dims, int comp, const float* x, const float* q,
                     const float* k, const float* geo, const float* y, const float* lse,
                     const float* gy, float* gx, float* gq, float* gk, float* ggeo_part,
                     int nthreads) {
  LR_DISPATCH(backward_any<float>)(LR_DIMS(dims), comp, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part,
                      nthreads);
}

void lr_backward_f64(const int64_t* dims, int comp, const double* x, const double* q,
                     const double* k, const double* geo, const double* y, const double* lse,
                     const double* gy, double* gx, double* gq, double* gk, double* ggeo_part,
                     int nthreads) {
  LR_DISPATCH(backward_any<double>)(LR_DIMS(dims), comp, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part,
                       nthreads);
}

}  // extern "C"
