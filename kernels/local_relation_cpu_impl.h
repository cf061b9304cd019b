// Kernels of local_relation_cpu.cpp, included there once per instruction set (inside a
// namespace, under a "#pragma GCC target" for the AVX2 copy): no include guard, no includes.

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

// Layout: x and k come polyphase-split by the stride s, (B, C, s*s, Ho, Wo): component
// (u, v) holds input (i*s + u, j*s + v) at (i, j), zero where that is outside the image (for
// s = 1 that is x itself). Offset (a, bb), dr = a - P, dc = bb - P, reads input
// (i*s + dr, j*s + dc) = component (dr mod s, dc mod s) at (i + floor(dr/s), j + floor(dc/s)):
// at flat output position p = i*Wo + j it reads component position p + shift, one constant
// per offset. So each offset is one long contiguous loop over the output plane (no per-row
// loop overhead on small images), over the positions whose read stays inside the component.
// Positions there whose neighbour is outside the image (including reads that wrap around a row
// edge) get a logit bias of -inf, hence a weight of exactly 0, and their products are skipped
// by a select (so non-finite values outside the window cannot leak in).

struct PlaneOffsets {
  // per offset o = a*K + bb: component index, read shift, loop range [lo, hi)
  std::vector<int64_t> comp, shift, lo, hi;
  explicit PlaneOffsets(const Dims& d)
      : comp(d.K * d.K), shift(d.K * d.K), lo(d.K * d.K), hi(d.K * d.K) {
    const int64_t K = d.K, P = K / 2, s = d.s, n = d.Ho * d.Wo;
    auto floor_div = [](int64_t v, int64_t by) { return v >= 0 ? v / by : -((-v + by - 1) / by); };
    for (int64_t a = 0; a < K; ++a) {
      for (int64_t bb = 0; bb < K; ++bb) {
        const int64_t o = a * K + bb, dr = a - P, dc = bb - P;
        const int64_t fr = floor_div(dr, s), fc = floor_div(dc, s);
        comp[o] = (dr - fr * s) * s + (dc - fc * s);
        shift[o] = fr * d.Wo + fc;
        // output rows i, columns j whose neighbour row / column is inside the image
        int64_t i_first = d.Ho, i_last = -1, j_any = 0;
        for (int64_t i = 0; i < d.Ho; ++i) {
          if (i * s + dr >= 0 && i * s + dr < d.H) {
            i_first = i < i_first ? i : i_first;
            i_last = i;
          }
        }
        for (int64_t j = 0; j < d.Wo; ++j) j_any |= (j * s + dc >= 0 && j * s + dc < d.W);
        // the loop: those rows (an offset reading nothing in the image is skipped), and reads
        // inside the component plane
        int64_t l = i_first * d.Wo, h = (i_last + 1) * d.Wo;
        if (!j_any) h = l;
        if (l < -shift[o]) l = -shift[o];
        if (h > n - shift[o]) h = n - shift[o];
        lo[o] = l;
        hi[o] = h > l ? h : l;
      }
    }
  }
};

// bias[o*Ho*Wo + p] = 0 where offset o of output p reads inside the image, else -inf.
template <typename T>
std::vector<T> offset_bias(const Dims& d) {
  const int64_t K = d.K, P = K / 2, n = d.Ho * d.Wo;
  std::vector<T> bias(K * K * n);
  for (int64_t a = 0; a < K; ++a) {
    for (int64_t bb = 0; bb < K; ++bb) {
      for (int64_t i = 0; i < d.Ho; ++i) {
        for (int64_t j = 0; j < d.Wo; ++j) {
          const int64_t r = i * d.s + a - P, c = j * d.s + bb - P;
          const bool inside = r >= 0 && r < d.H && c >= 0 && c < d.W;
          bias[(a * K + bb) * n + i * d.Wo + j] =
              inside ? T(0) : -std::numeric_limits<T>::infinity();
        }
      }
    }
  }
  return bias;
}

// acc[n*HoWo + p] = sum over offsets of w * x (channel n of the NC from x_first on).
template <typename T, int NC>
inline void plane_aggregate(const Dims& d, const PlaneOffsets& po, const T* w, const T* x_first,
                            T* acc) {
  const int64_t KK = d.K * d.K, HW = d.Ho * d.Wo, XP = d.s * d.s * HW;
  for (int64_t p = 0; p < NC * HW; ++p) acc[p] = 0;
  for (int64_t o = 0; o < KK; ++o) {
    const T* wo = w + o * HW;
    const T* xs = x_first + po.comp[o] * HW + po.shift[o];
    const int64_t lo = po.lo[o], hi = po.hi[o];
#pragma omp simd
    for (int64_t p = lo; p < hi; ++p) {
      const T wv = wo[p];
      for (int n = 0; n < NC; ++n) acc[n * HW + p] += wv == T(0) ? T(0) : wv * xs[n * XP + p];
    }
  }
}

template <typename T, int COMP>
void forward_plane(const Dims& d, const T* x, const T* q, const T* k, const T* geo, T* y, T* lse,
                   int nthreads) {
  const int64_t KK = d.K * d.K, HW = d.Ho * d.Wo, XP = d.s * d.s * HW;
  const PlaneOffsets po(d);
  const std::vector<T> bias = offset_bias<T>(d);
  const int64_t pairs = d.B * d.G;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> wbuf(KK * HW), mx(HW), inv(HW), acc(4 * HW);
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < pairs; ++bg) {
      const int64_t g = bg % d.G, b = bg / d.G;
      const T* qp = q + bg * HW;
      const T* kp = k + bg * XP;
      T* w = wbuf.data();
      for (int64_t p = 0; p < HW; ++p) mx[p] = -std::numeric_limits<T>::infinity();
      for (int64_t o = 0; o < KK; ++o) {
        T* wo = w + o * HW;
        const T* ks = kp + po.comp[o] * HW + po.shift[o];
        const T* cb = bias.data() + o * HW;
        const T gv = geo[g * KK + o];
        const int64_t lo = po.lo[o], hi = po.hi[o];
#pragma omp simd
        for (int64_t p = lo; p < hi; ++p) {
          const T l = phi<T, COMP>(qp[p], ks[p]) + gv + cb[p];
          wo[p] = l;
          mx[p] = l > mx[p] ? l : mx[p];
        }
      }
      for (int64_t p = 0; p < HW; ++p) inv[p] = 0;
      for (int64_t o = 0; o < KK; ++o) {
        T* wo = w + o * HW;
        const int64_t lo = po.lo[o], hi = po.hi[o];
#pragma omp simd
        for (int64_t p = lo; p < hi; ++p) {
          const T e = exp_nonpositive(wo[p] - mx[p]);
          wo[p] = e;
          inv[p] += e;
        }
      }
      T* lse_p = lse + bg * HW;
      for (int64_t p = 0; p < HW; ++p) {
        lse_p[p] = mx[p] + std::log(inv[p]);
        inv[p] = T(1) / inv[p];
      }
      const int64_t c_end = (g + 1) * d.m < d.C ? (g + 1) * d.m : d.C;
      int64_t c = g * d.m;
      while (c < c_end) {
        const int nc = c_end - c >= 4 ? 4 : (c_end - c >= 2 ? 2 : 1);
        const T* x_first = x + (b * d.C + c) * XP;
        if (nc == 4) plane_aggregate<T, 4>(d, po, w, x_first, acc.data());
        else if (nc == 2) plane_aggregate<T, 2>(d, po, w, x_first, acc.data());
        else plane_aggregate<T, 1>(d, po, w, x_first, acc.data());
        for (int n = 0; n < nc; ++n) {
          T* yp = y + (b * d.C + c + n) * HW;
          const T* an = acc.data() + n * HW;
#pragma omp simd
          for (int64_t p = 0; p < HW; ++p) yp[p] = an[p] * inv[p];
        }
        c += nc;
      }
    }
  }
}

template <typename T, int NC>
inline void plane_backward_channels(const Dims& d, const PlaneOffsets& po, const T* w, T* dw,
                                    const T* x_first, T* gx_first, const T* gy_first) {
  const int64_t KK = d.K * d.K, HW = d.Ho * d.Wo, XP = d.s * d.s * HW;
  for (int64_t o = 0; o < KK; ++o) {
    const T* wo = w + o * HW;
    T* dwo = dw + o * HW;
    const T* xs = x_first + po.comp[o] * HW + po.shift[o];
    T* gxs = gx_first + po.comp[o] * HW + po.shift[o];
    const int64_t lo = po.lo[o], hi = po.hi[o];
#pragma omp simd
    for (int64_t p = lo; p < hi; ++p) {
      const T wv = wo[p];
      T acc = 0;
      for (int n = 0; n < NC; ++n) {
        const T g = gy_first[n * HW + p];
        acc += g * xs[n * XP + p];
        gxs[n * XP + p] += wv == T(0) ? T(0) : wv * g;
      }
      dwo[p] += wv == T(0) ? T(0) : acc;
    }
  }
}

template <typename T, int COMP>
void backward_plane(const Dims& d, const T* x, const T* q, const T* k, const T* geo, const T* y,
                    const T* lse, const T* gy, T* gx, T* gq, T* gk, T* ggeo_part,
                    int nthreads) {
  const int64_t KK = d.K * d.K, HW = d.Ho * d.Wo, XP = d.s * d.s * HW;
  const PlaneOffsets po(d);
  const std::vector<T> bias = offset_bias<T>(d);
  const int64_t pairs = d.B * d.G;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> wbuf(KK * HW), dwbuf(KK * HW), dot(HW);
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < pairs; ++bg) {
      const int64_t g = bg % d.G, b = bg / d.G;
      const int64_t c_begin = g * d.m, c_end = (g + 1) * d.m < d.C ? (g + 1) * d.m : d.C;
      const T* qp = q + bg * HW;
      const T* kp = k + bg * XP;
      const T* lse_p = lse + bg * HW;
      T* w = wbuf.data();
      T* dw = dwbuf.data();
      for (int64_t o = 0; o < KK; ++o) {
        T* wo = w + o * HW;
        T* dwo = dw + o * HW;
        const T* ks = kp + po.comp[o] * HW + po.shift[o];
        const T* cb = bias.data() + o * HW;
        const T gv = geo[g * KK + o];
        const int64_t lo = po.lo[o], hi = po.hi[o];
#pragma omp simd
        for (int64_t p = lo; p < hi; ++p) {
          wo[p] = exp_nonpositive(phi<T, COMP>(qp[p], ks[p]) + gv + cb[p] - lse_p[p]);
          dwo[p] = 0;
        }
      }
      for (int64_t p = 0; p < HW; ++p) dot[p] = 0;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const T* gyp = gy + (b * d.C + c) * HW;
        const T* yp = y + (b * d.C + c) * HW;
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) dot[p] += gyp[p] * yp[p];
      }
      int64_t c = c_begin;
      while (c < c_end) {
        const int nc = c_end - c >= 4 ? 4 : (c_end - c >= 2 ? 2 : 1);
        const int64_t off = (b * d.C + c) * XP;
        const T* gyf = gy + (b * d.C + c) * HW;
        if (nc == 4) plane_backward_channels<T, 4>(d, po, w, dw, x + off, gx + off, gyf);
        else if (nc == 2) plane_backward_channels<T, 2>(d, po, w, dw, x + off, gx + off, gyf);
        else plane_backward_channels<T, 1>(d, po, w, dw, x + off, gx + off, gyf);
        c += nc;
      }
      T* gqp = gq + bg * HW;
      T* gkp = gk + bg * XP;
      T* ggeo = ggeo_part + bg * KK;
      for (int64_t o = 0; o < KK; ++o) {
        const T* wo = w + o * HW;
        const T* dwo = dw + o * HW;
        const T* ks = kp + po.comp[o] * HW + po.shift[o];
        T* gks = gkp + po.comp[o] * HW + po.shift[o];
        const int64_t lo = po.lo[o], hi = po.hi[o];
        T geo_sum = 0;
#pragma omp simd reduction(+ : geo_sum)
        for (int64_t p = lo; p < hi; ++p) {
          const T wv = wo[p];
          const T dl = wv == T(0) ? T(0) : wv * (dwo[p] - dot[p]);
          geo_sum += dl;
          const T qv = qp[p], kv = ks[p];
          gqp[p] += dl * dphi_dq<T, COMP>(qv, kv);
          gks[p] += dl * dphi_dk<T, COMP>(qv, kv);
        }
        ggeo[o] = geo_sum;
      }
    }
  }
}

template <typename T>
void forward_any(const Dims& d, int comp, const T* x, const T* q, const T* k, const T* geo, T* y,
                 T* lse, int nthreads) {
  if (comp == kSqdiff) forward_plane<T, kSqdiff>(d, x, q, k, geo, y, lse, nthreads);
  else if (comp == kAbsdiff) forward_plane<T, kAbsdiff>(d, x, q, k, geo, y, lse, nthreads);
  else forward_plane<T, kMul>(d, x, q, k, geo, y, lse, nthreads);
}

template <typename T>
void backward_any(const Dims& d, int comp, const T* x, const T* q, const T* k, const T* geo,
                  const T* y, const T* lse, const T* gy, T* gx, T* gq, T* gk, T* ggeo_part,
                  int nthreads) {
  if (comp == kSqdiff)
    backward_plane<T, kSqdiff>(d, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part, nthreads);
  else if (comp == kAbsdiff)
    backward_plane<T, kAbsdiff>(d, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part, nthreads);
  else
    backward_plane<T, kMul>(d, x, q, k, geo, y, lse, gy, gx, gq, gk, ggeo_part, nthreads);
}
