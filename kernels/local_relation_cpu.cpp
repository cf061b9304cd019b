// Fused CPU kernels of the local relation op (DESIGN.md §1), loaded by robustlr/ops/cpu_backend.py.
//
// Plain C++ with OpenMP, no PyTorch headers (so the one-off JIT build takes seconds): Python
// hands contiguous NCHW buffers over as raw pointers (ctypes). Semantics equal the reference
// backend: channel c uses group g = c / m; output (i, j) reads input (i*s - P + a, j*s - P + b)
// for the in-image offsets (a, b) of the K x K window only (softmax over those); logits are
// phi(q, k) + geo[g, a, b] with phi = -(q-k)^2, -|q-k| or q*k.
//
// Forward, parallel over (batch, group, output row): the logits of one output row over the
// window live in a per-thread K*K*Wo buffer (a few KiB), then max, exp-sum (log-sum-exp saved
// per position), normalised weights, and the aggregation of the group's m channels. Inner loops
// run along the output row (j), so the compiler vectorises them (stride 1 reads contiguously).
// Backward, parallel over (batch, group): each (b, g) owns its m channels of grad x, its own
// channel of grad q and grad k, and a private K*K slot of grad geo partials (summed over the
// batch by the caller), so no two threads ever write the same element and results are
// deterministic. Weights are recomputed from the saved log-sum-exp; D = sum_c gy_c y_c.

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kSqdiff = 0;
constexpr int kAbsdiff = 1;
constexpr int kMul = 2;

// exp(x) for x <= 0 in float: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the degree-7
// Taylor polynomial (truncation error < 6e-9 relative, below float rounding). Written with
// plain arithmetic and bit copies so that loops calling it vectorise without -ffast-math.
// Returns 0 below -87 (where 2^n would leave the normal range; e^-87 ~ 1.6e-38).
inline float exp_nonpositive(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  const int32_t scale_bits = (bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename T, int COMP>
inline T phi(T qv, T kv) {
  if (COMP == kMul) return qv * kv;
  const T d = qv - kv;
  if (COMP == kSqdiff) return -d * d;
  return -std::fabs(d);
}

// dphi/dq; dphi/dk is its negative for sqdiff and absdiff, q for mul.
template <typename T, int COMP>
inline T dphi_dq(T qv, T kv) {
  if (COMP == kMul) return kv;
  const T d = qv - kv;
  if (COMP == kSqdiff) return T(-2) * d;
  return T((d < 0) - (d > 0));  // -sign(d)
}

template <typename T, int COMP>
inline T dphi_dk(T qv, T kv) {
  if (COMP == kMul) return qv;
  return -dphi_dq<T, COMP>(qv, kv);
}

struct Dims {
  int64_t B, C, H, W, G, m, Ho, Wo, K, s;
};

// The output columns j whose window column offset b lands inside the image: [lo[b], hi[b]).
struct ColumnRanges {
  std::vector<int64_t> lo, hi;
  explicit ColumnRanges(const Dims& d) : lo(d.K), hi(d.K) {
    const int64_t P = d.K / 2;
    for (int64_t b = 0; b < d.K; ++b) {
      // need 0 <= j*s - P + b <= W - 1
      const int64_t first = P - b > 0 ? (P - b + d.s - 1) / d.s : 0;
      const int64_t last = d.W - 1 + P - b;  // j*s <= last
      int64_t end = last >= 0 ? last / d.s + 1 : 0;
      if (end > d.Wo) end = d.Wo;
      lo[b] = first < end ? first : end;
      hi[b] = end;
    }
  }
};

// Logits of output row i of (batch b, group g) over the in-image window rows [a_lo, a_hi):
// w[(a*K + bb)*Wo + j] for j in the column range of bb; running max in mx.
template <typename T, int COMP>
inline void row_logits(const Dims& d, const ColumnRanges& cols, const T* qrow, const T* kplane,
                       const T* geo_g, int64_t i, int64_t a_lo, int64_t a_hi, T* w, T* mx) {
  const int64_t K = d.K, P = K / 2, s = d.s, Wo = d.Wo;
  for (int64_t j = 0; j < Wo; ++j) mx[j] = -std::numeric_limits<T>::infinity();
  for (int64_t a = a_lo; a < a_hi; ++a) {
    const T* krow = kplane + (i * s - P + a) * d.W;
    for (int64_t bb = 0; bb < K; ++bb) {
      T* wo = w + (a * K + bb) * Wo;
      const T gv = geo_g[a * K + bb];
      const T* kc = krow + bb - P;
      const int64_t lo = cols.lo[bb], hi = cols.hi[bb];
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j) {
        const T l = phi<T, COMP>(qrow[j], kc[j * s]) + gv;
        wo[j] = l;
        mx[j] = l > mx[j] ? l : mx[j];
      }
    }
  }
}

template <typename T, int COMP>
void forward(const Dims& d, const T* x, const T* q, const T* k, const T* geo, T* y, T* lse,
             int nthreads) {
  const int64_t K = d.K, KK = K * K, P = K / 2, s = d.s, Wo = d.Wo, Ho = d.Ho;
  const ColumnRanges cols(d);
  const int64_t rows = d.B * d.G * Ho;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> wbuf(KK * Wo), mx(Wo), sum(Wo), acc(Wo);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t i = t % Ho, bg = t / Ho, g = bg % d.G, b = bg / d.G;
      const int64_t a_lo = P - i * s > 0 ? P - i * s : 0;
      const int64_t a_hi = d.H + P - i * s < K ? d.H + P - i * s : K;
      const T* qrow = q + (bg * Ho + i) * Wo;
      row_logits<T, COMP>(d, cols, qrow, k + bg * d.H * d.W, geo + g * KK, i, a_lo, a_hi,
                          wbuf.data(), mx.data());
      T* w = wbuf.data();
      for (int64_t j = 0; j < Wo; ++j) sum[j] = 0;
      for (int64_t a = a_lo; a < a_hi; ++a) {
        for (int64_t bb = 0; bb < K; ++bb) {
          T* wo = w + (a * K + bb) * Wo;
          const int64_t lo = cols.lo[bb], hi = cols.hi[bb];
#pragma omp simd
          for (int64_t j = lo; j < hi; ++j) {
            const T e = exp_nonpositive(wo[j] - mx[j]);
            wo[j] = e;
            sum[j] += e;
          }
        }
      }
      T* lse_row = lse + (bg * Ho + i) * Wo;
      for (int64_t j = 0; j < Wo; ++j) {
        lse_row[j] = mx[j] + std::log(sum[j]);
        sum[j] = T(1) / sum[j];
      }
      for (int64_t a = a_lo; a < a_hi; ++a) {
        for (int64_t bb = 0; bb < K; ++bb) {
          T* wo = w + (a * K + bb) * Wo;
          const int64_t lo = cols.lo[bb], hi = cols.hi[bb];
#pragma omp simd
          for (int64_t j = lo; j < hi; ++j) wo[j] *= sum[j];
        }
      }
      const int64_t c_end = (g + 1) * d.m < d.C ? (g + 1) * d.m : d.C;
      for (int64_t c = g * d.m; c < c_end; ++c) {
        const T* xplane = x + (b * d.C + c) * d.H * d.W;
        for (int64_t j = 0; j < Wo; ++j) acc[j] = 0;
        for (int64_t a = a_lo; a < a_hi; ++a) {
          const T* xrow = xplane + (i * s - P + a) * d.W;
          for (int64_t bb = 0; bb < K; ++bb) {
            const T* wo = w + (a * K + bb) * Wo;
            const T* xc = xrow + bb - P;
            const int64_t lo = cols.lo[bb], hi = cols.hi[bb];
#pragma omp simd
            for (int64_t j = lo; j < hi; ++j) acc[j] += wo[j] * xc[j * s];
          }
        }
        T* yrow = y + ((b * d.C + c) * Ho + i) * Wo;
        for (int64_t j = 0; j < Wo; ++j) yrow[j] = acc[j];
      }
    }
  }
}

template <typename T, int COMP>
void backward(const Dims& d, const T* x, const T* q, const T* k, const T* geo, const T* y,
              const T* lse, const T* gy, T* gx, T* gq, T* gk, T* ggeo_part, int nthreads) {
  const int64_t K = d.K, KK = K * K, P = K / 2, s = d.s, Wo = d.Wo, Ho = d.Ho;
  const int64_t HW = d.H * d.W, HoWo = Ho * Wo;
  const ColumnRanges cols(d);
  const int64_t pairs = d.B * d.G;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> wbuf(KK * Wo), dwbuf(KK * Wo), mx(Wo), dot(Wo);
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < pairs; ++bg) {
      const int64_t g = bg % d.G, b = bg / d.G;
      const int64_t c_begin = g * d.m, c_end = (g + 1) * d.m < d.C ? (g + 1) * d.m : d.C;
      const T* kplane = k + bg * HW;
      T* gkplane = gk + bg * HW;
      T* ggeo = ggeo_part + bg * KK;
      for (int64_t o = 0; o < KK; ++o) ggeo[o] = 0;
      T* w = wbuf.data();
      T* dw = dwbuf.data();
      for (int64_t i = 0; i < Ho; ++i) {
        const int64_t a_lo = P - i * s > 0 ? P - i * s : 0;
        const int64_t a_hi = d.H + P - i * s < K ? d.H + P - i * s : K;
        const T* qrow = q + bg * HoWo + i * Wo;
        const T* lse_row = lse + bg * HoWo + i * Wo;
        row_logits<T, COMP>(d, cols, qrow, kplane, geo + g * KK, i, a_lo, a_hi, w, mx.data());
        for (int64_t a = a_lo; a < a_hi; ++a) {
          for (int64_t bb = 0; bb < K; ++bb) {
            T* wo = w + (a * K + bb) * Wo;
            T* dwo = dw + (a * K + bb) * Wo;
            const int64_t lo = cols.lo[bb], hi = cols.hi[bb];
#pragma omp simd
            for (int64_t j = lo; j < hi; ++j) {
              wo[j] = exp_nonpositive(wo[j] - lse_row[j]);
              dwo[j] = 0;
            }
          }
        }
        for (int64_t j = 0; j < Wo; ++j) dot[j] = 0;
        for (int64_t c = c_begin; c < c_end; ++c) {
          const int64_t plane = b * d.C + c;
          const T* gyrow = gy + plane * HoWo + i * Wo;
          const T* yrow = y + plane * HoWo + i * Wo;
#pragma omp simd
          for (int64_t j = 0; j < Wo; ++j) dot[j] += gyrow[j] * yrow[j];
          for (int64_t a = a_lo; a < a_hi; ++a) {
            const T* xrow = x + plane * HW + (i * s - P + a) * d.W;
            T* gxrow = gx + plane * HW + (i * s - P + a) * d.W;
            for (int64_t bb = 0; bb < K; ++bb) {
              const T* wo = w + (a * K + bb) * Wo;
              T* dwo = dw + (a * K + bb) * Wo;
              const T* xc = xrow + bb - P;
              T* gxc = gxrow + bb - P;
              const int64_t lo = cols.lo[bb], hi = cols.hi[bb];
#pragma omp simd
              for (int64_t j = lo; j < hi; ++j) {
                dwo[j] += gyrow[j] * xc[j * s];
                gxc[j * s] += wo[j] * gyrow[j];
              }
            }
          }
        }
        T* gqrow = gq + bg * HoWo + i * Wo;
        for (int64_t a = a_lo; a < a_hi; ++a) {
          const T* krow = kplane + (i * s - P + a) * d.W;
          T* gkrow = gkplane + (i * s - P + a) * d.W;
          for (int64_t bb = 0; bb < K; ++bb) {
            const T* wo = w + (a * K + bb) * Wo;
            const T* dwo = dw + (a * K + bb) * Wo;
            const T* kc = krow + bb - P;
            T* gkc = gkrow + bb - P;
            const int64_t lo = cols.lo[bb], hi = cols.hi[bb];
            T geo_sum = 0;
#pragma omp simd reduction(+ : geo_sum)
            for (int64_t j = lo; j < hi; ++j) {
              const T dl = wo[j] * (dwo[j] - dot[j]);
              geo_sum += dl;
              const T qv = qrow[j], kv = kc[j * s];
              gqrow[j] += dl * dphi_dq<T, COMP>(qv, kv);
              gkc[j * s] += dl * dphi_dk<T, COMP>(qv, kv);
            }
            ggeo[a * K + bb] += geo_sum;
          }
        }
      }
    }
  }
}

template <typename T>
void forward_any(const Dims& d, int comp, const T* x, const T* q, const T* k, const T* geo, T* y,
                 T* lse, int nthreads) {
  if (comp == kSqdiff) forward<T, kSqdiff>(d, x, q, k, geo, y, lse, nthreads);
  else if (comp == kAbsdiff) forward<T, kAbsdiff>(d, x, q, k, geo, y, lse, nthreads);
  else forward<T, kMul>(d, x, q, k, geo, y, lse, nthreads);
}

template <typename T>
void backward_any(const Dims& d, int comp, const T* x, const T* q, const T* k, const T* geo,
                  const T* y, const T* lse, const T* gy, T* gx, T* gq, T* gk, T* ggeo_part,
                  int nthreads) {
  if (comp == kSqdiff)
    backward<T, kSqdiff>(d, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part, nthreads);
  else if (comp == kAbsdiff)
    backward<T, kAbsdiff>(d, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part, nthreads);
  else
    backward<T, kMul>(d, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part, nthreads);
}

}  // namespace

// dims: B, C, H, W, G, m, Ho, Wo, K, s (10 int64). Outputs y (B, C, Ho, Wo), lse (B, G, Ho, Wo).
// Backward outputs gx, gq, gk must be zero-filled; ggeo_part (B, G, K, K) is overwritten.
extern "C" {

int lr_cpu_abi_version() { return 1; }

#define LR_DIMS(p) Dims{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]}

void lr_forward_f32(const int64_t* dims, int comp, const float* x, const float* q,
                    const float* k, const float* geo, float* y, float* lse, int nthreads) {
  forward_any<float>(LR_DIMS(dims), comp, x, q, k, geo, y, lse, nthreads);
}

void lr_forward_f64(const int64_t* dims, int comp, const double* x, const double* q,
                    const double* k, const double* geo, double* y, double* lse, int nthreads) {
  forward_any<double>(LR_DIMS(dims), comp, x, q, k, geo, y, lse, nthreads);
}

void lr_backward_f32(const int64_t* dims, int comp, const float* x, const float* q,
                     const float* k, const float* geo, const float* y, const float* lse,
                     const float* gy, float* gx, float* gq, float* gk, float* ggeo_part,
                     int nthreads) {
  backward_any<float>(LR_DIMS(dims), comp, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part,
                      nthreads);
}

void lr_backward_f64(const int64_t* dims, int comp, const double* x, const double* q,
                     const double* k, const double* geo, const double* y, const double* lse,
                     const double* gy, double* gx, double* gq, double* gk, double* ggeo_part,
                     int nthreads) {
  backward_any<double>(LR_DIMS(dims), comp, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part,
                       nthreads);
}

}  // extern "C"
