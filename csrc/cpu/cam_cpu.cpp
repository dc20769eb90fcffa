// CPU kernels of the Grad-CAM ops: one image per task (at::parallel_for over the batch).
//
// An image is a [rows, n] row-major block: [K, H*W] for NCHW (contiguous) features and [H*W, K]
// for channels_last ones (each layout is read in place, no copy). The forward needs two
// primitives on it, with the roles of the two layouts swapped:
//   weighted_rows: out[j] = sum_r w[r] A[r, j]   (K-outer loop, register accumulators over j)
//   rows_dot:      out[r] = sum_j x[j] A[r, j]   (eight rows at a time, one horizontal sum for 8)
// NCHW: s = weighted_rows(w, A), pooled = rows_dot(pool_w, A); channels_last: s = rows_dot(w, A),
// pooled = weighted_rows(pool_w, A). The image ([K, H*W], 128 KiB at K=512, 8x8, float32) is read
// from memory once and stays in cache for the pooling pass. The backward is one pass per image:
// grad_features ([B, K, H, W] contiguous, as on CUDA) is an outer-product sum that does not read
// the features, grad_weights the primitive that matches the layout of the features.
//
// float32 runs explicit AVX2/FMA code when the CPU has it (chosen once at run time; the
// environment variable ICAKD_CPU_VECTOR=generic forces the portable loops); the forward widens
// float16/bfloat16 images to float32 first and takes the same path; every other case runs plain
// loops written for the auto-vectoriser. Everything accumulates in
// float32 (float64 for float64 inputs), in an order fixed by the shapes only: results do not
// depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ICAKD_X86_AVX2 1
#else
#define ICAKD_X86_AVX2 0
#endif

namespace icakd {
namespace {

using at::Tensor;

int64_t image_grain(int64_t per_image) {
  // about 32k elements of work per task at least
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(per_image, 1));
}

// ---------------------------------------------------------------------------------------------
// portable primitives (plain loops; the compiler vectorises the fixed-size inner loops)
// ---------------------------------------------------------------------------------------------

template <int PB, typename acc_t, typename a_t>
inline void weighted_rows_block(const acc_t* w, const a_t* A, int64_t rows, int64_t n, int64_t j0, acc_t* out) {
  acc_t acc[PB];
  for (int j = 0; j < PB; ++j) acc[j] = acc_t(0);
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t wr = w[r];
    const a_t* a = A + r * n + j0;
    for (int j = 0; j < PB; ++j) acc[j] += wr * static_cast<acc_t>(a[j]);
  }
  for (int j = 0; j < PB; ++j) out[j0 + j] = acc[j];
}

// out[j] = sum_r w[r] A[r * n + j], j < n (rows added in order)
template <typename acc_t, typename a_t>
void weighted_rows_generic(const acc_t* w, const a_t* A, int64_t rows, int64_t n, acc_t* out) {
  int64_t j0 = 0;
  for (; j0 + 64 <= n; j0 += 64) weighted_rows_block<64>(w, A, rows, n, j0, out);
  if (j0 + 32 <= n) {
    weighted_rows_block<32>(w, A, rows, n, j0, out);
    j0 += 32;
  }
  if (j0 + 16 <= n) {
    weighted_rows_block<16>(w, A, rows, n, j0, out);
    j0 += 16;
  }
  if (j0 + 8 <= n) {
    weighted_rows_block<8>(w, A, rows, n, j0, out);
    j0 += 8;
  }
  if (j0 < n) {
    const int64_t m = n - j0;
    for (int64_t j = 0; j < m; ++j) out[j0 + j] = acc_t(0);
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t wr = w[r];
      const a_t* a = A + r * n + j0;
      for (int64_t j = 0; j < m; ++j) out[j0 + j] += wr * static_cast<acc_t>(a[j]);
    }
  }
}

// out[r] = sum_j x[j] A[r * n + j], r < rows
template <typename acc_t, typename a_t>
void rows_dot_generic(const acc_t* x, const a_t* A, int64_t rows, int64_t n, acc_t* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = dot_acc<acc_t>(x, A + r * n, n);
}

// ---------------------------------------------------------------------------------------------
// float32 AVX2/FMA primitives (same contracts; tails through masked loads, never past the end)
// ---------------------------------------------------------------------------------------------

#if ICAKD_X86_AVX2
#define ICAKD_AVX2 __attribute__((target("avx2,fma")))

// lanes [0, m) set, m in [1, 8]
ICAKD_AVX2 inline __m256i tail_mask(int64_t m) {
  alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - m));
}

// [sum(v0), ..., sum(v7)]; each sum is ((e0+e1)+(e2+e3)) + ((e4+e5)+(e6+e7))
ICAKD_AVX2 inline __m256 hsum8(const __m256* v) {
  const __m256 s01 = _mm256_hadd_ps(v[0], v[1]);
  const __m256 s23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 s45 = _mm256_hadd_ps(v[4], v[5]);
  const __m256 s67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23);
  const __m256 s4567 = _mm256_hadd_ps(s45, s67);
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
  const __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

// sum(v) in the order of hsum8
ICAKD_AVX2 inline float hsum1(__m256 v) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(v, v), _mm256_hadd_ps(v, v));
  const __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  return _mm_cvtss_f32(t);
}

ICAKD_AVX2 void rows_dot_avx2(const float* x, const float* A, int64_t rows, int64_t n, float* out) {
  const int64_t nfull = n / 8 * 8;
  const int64_t rem = n - nfull;
  const __m256i mask = rem > 0 ? tail_mask(rem) : _mm256_setzero_si256();
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    const float* a = A + r * n;
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nfull; j += 8) {
      const __m256 xv = _mm256_loadu_ps(x + j);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(a + i * n + j), acc[i]);
    }
    if (rem > 0) {
      const __m256 xv = _mm256_maskload_ps(x + nfull, mask);
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(xv, _mm256_maskload_ps(a + i * n + nfull, mask), acc[i]);
    }
    _mm256_storeu_ps(out + r, hsum8(acc));
  }
  for (; r < rows; ++r) {
    const float* a = A + r * n;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < nfull; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(a + j), acc);
    if (rem > 0) {
      acc = _mm256_fmadd_ps(_mm256_maskload_ps(x + nfull, mask), _mm256_maskload_ps(a + nfull, mask), acc);
    }
    out[r] = hsum1(acc);
  }
}

// columns [j0, j0 + 8 * NC) of weighted_rows, the last chunk under `last` (a partial chunk)
template <int NC>
ICAKD_AVX2 inline void weighted_rows_chunk_avx2(const float* w, const float* A, int64_t rows, int64_t n, int64_t j0,
                                                __m256i last, float* out) {
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 wr = _mm256_broadcast_ss(w + r);
    const float* a = A + r * n + j0;
    for (int c = 0; c < NC - 1; ++c) acc[c] = _mm256_fmadd_ps(wr, _mm256_loadu_ps(a + 8 * c), acc[c]);
    acc[NC - 1] = _mm256_fmadd_ps(wr, _mm256_maskload_ps(a + 8 * (NC - 1), last), acc[NC - 1]);
  }
  for (int c = 0; c < NC - 1; ++c) _mm256_storeu_ps(out + j0 + 8 * c, acc[c]);
  _mm256_maskstore_ps(out + j0 + 8 * (NC - 1), last, acc[NC - 1]);
}

ICAKD_AVX2 void weighted_rows_avx2(const float* w, const float* A, int64_t rows, int64_t n, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t m = std::min<int64_t>(64, n - j0);
    const int nc = static_cast<int>((m + 7) / 8);
    const __m256i last = tail_mask(m - 8 * (nc - 1));
    switch (nc) {
      case 1: weighted_rows_chunk_avx2<1>(w, A, rows, n, j0, last, out); break;
      case 2: weighted_rows_chunk_avx2<2>(w, A, rows, n, j0, last, out); break;
      case 3: weighted_rows_chunk_avx2<3>(w, A, rows, n, j0, last, out); break;
      case 4: weighted_rows_chunk_avx2<4>(w, A, rows, n, j0, last, out); break;
      case 5: weighted_rows_chunk_avx2<5>(w, A, rows, n, j0, last, out); break;
      case 6: weighted_rows_chunk_avx2<6>(w, A, rows, n, j0, last, out); break;
      case 7: weighted_rows_chunk_avx2<7>(w, A, rows, n, j0, last, out); break;
      default: weighted_rows_chunk_avx2<8>(w, A, rows, n, j0, last, out); break;
    }
  }
}

#undef ICAKD_AVX2
#endif  // ICAKD_X86_AVX2

bool use_avx2_f32() {
  static const bool use = [] {
    const char* env = std::getenv("ICAKD_CPU_VECTOR");
    if (env != nullptr && std::strcmp(env, "generic") == 0) return false;
#if ICAKD_X86_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return use;
}

template <typename acc_t, typename a_t>
inline void weighted_rows(const acc_t* w, const a_t* A, int64_t rows, int64_t n, acc_t* out) {
#if ICAKD_X86_AVX2
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<a_t, float>) {
    if (use_avx2_f32()) return weighted_rows_avx2(w, A, rows, n, out);
  }
#endif
  weighted_rows_generic<acc_t, a_t>(w, A, rows, n, out);
}

template <typename acc_t, typename a_t>
inline void rows_dot(const acc_t* x, const a_t* A, int64_t rows, int64_t n, acc_t* out) {
#if ICAKD_X86_AVX2
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<a_t, float>) {
    if (use_avx2_f32()) return rows_dot_avx2(x, A, rows, n, out);
  }
#endif
  rows_dot_generic<acc_t, a_t>(x, A, rows, n, out);
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// cam = relu(s); pool_w = m / sum(m) with m the min-max map (uniform when sum(m) == 0)
template <typename acc_t>
inline void cam_map_and_pool_weights(const acc_t* s, acc_t* cb, acc_t* pw, int64_t P, bool with_pooled) {
  acc_t lo = std::numeric_limits<acc_t>::infinity();
  acc_t hi = -std::numeric_limits<acc_t>::infinity();
  for (int64_t p = 0; p < P; ++p) {
    const acc_t v = s[p] > acc_t(0) ? s[p] : acc_t(0);
    cb[p] = v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (!with_pooled) return;
  const acc_t den_mm = (hi - lo) + acc_t(1e-7);
  acc_t msum = 0;
  for (int64_t p = 0; p < P; ++p) {
    const acc_t m = (cb[p] - lo) / den_mm;
    pw[p] = m;
    msum += m;
  }
  if (msum > acc_t(0)) {
    for (int64_t p = 0; p < P; ++p) pw[p] = pw[p] / msum;
  } else {
    const acc_t u = acc_t(1) / static_cast<acc_t>(P);
    for (int64_t p = 0; p < P; ++p) pw[p] = u;
  }
}

// one image: s, cam, pool_w, pooled (a_t: the element type the primitives read)
template <typename acc_t, typename a_t>
void cam_fwd_image(const a_t* Ab, const acc_t* wb, acc_t* cb, acc_t* pw, acc_t* ob, acc_t* s, int64_t K, int64_t P,
                   bool with_pooled, bool channels_last) {
  if (channels_last) {
    rows_dot<acc_t, a_t>(wb, Ab, P, K, s);
  } else {
    weighted_rows<acc_t, a_t>(wb, Ab, K, P, s);
  }
  cam_map_and_pool_weights<acc_t>(s, cb, pw, P, with_pooled);
  if (!with_pooled) return;
  if (channels_last) {
    weighted_rows<acc_t, a_t>(pw, Ab, P, K, ob);
  } else {
    rows_dot<acc_t, a_t>(pw, Ab, K, P, ob);
  }
}

// float16 / bfloat16 maps are widened to float32 one image at a time (a task-local buffer that
// stays in cache), so that they run the float32 primitives (AVX2/FMA where available) on exactly
// the values the portable loops would convert element by element.
template <typename scalar_t, typename acc_t>
void cam_fwd_kernel(const scalar_t* A, const acc_t* w, acc_t* cam, acc_t* pooled, acc_t* pool_w, int64_t B,
                    int64_t K, int64_t P, bool with_pooled, bool channels_last) {
  constexpr bool kWiden = std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, float>;
  at::parallel_for(0, B, image_grain(K * P), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> s(P);
    std::vector<float> wide(kWiden ? K * P : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* Ab = A + b * K * P;
      acc_t* pw = with_pooled ? pool_w + b * P : nullptr;
      acc_t* ob = with_pooled ? pooled + b * K : nullptr;
      if constexpr (kWiden) {
        for (int64_t i = 0; i < K * P; ++i) wide[i] = static_cast<float>(Ab[i]);
        cam_fwd_image<acc_t, float>(wide.data(), w + b * K, cam + b * P, pw, ob, s.data(), K, P, with_pooled,
                                    channels_last);
      } else {
        cam_fwd_image<acc_t, scalar_t>(Ab, w + b * K, cam + b * P, pw, ob, s.data(), K, P, with_pooled,
                                       channels_last);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> cam_fwd_cpu(const Tensor& features, const Tensor& weights, bool with_pooled) {
  const CamDims d = check_cam(features, weights, c10::DeviceType::CPU);
  const bool cl = cam_reads_channels_last(features);
  const Tensor A = cl ? features : features.contiguous();
  const Tensor w = weights.to(d.acc).contiguous();
  CamFwdOutputs o = alloc_cam_fwd(features, d, with_pooled);
  if (d.B > 0 && d.P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "icakd_cam_fwd_cpu", [&] {
      if (d.acc == at::kDouble) {
        cam_fwd_kernel<scalar_t, double>(A.const_data_ptr<scalar_t>(), w.const_data_ptr<double>(),
                                         o.cam.data_ptr<double>(), with_pooled ? o.pooled.data_ptr<double>() : nullptr,
                                         with_pooled ? o.pool_w.data_ptr<double>() : nullptr, d.B, d.K, d.P,
                                         with_pooled, cl);
      } else {
        cam_fwd_kernel<scalar_t, float>(A.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
                                        o.cam.data_ptr<float>(), with_pooled ? o.pooled.data_ptr<float>() : nullptr,
                                        with_pooled ? o.pool_w.data_ptr<float>() : nullptr, d.B, d.K, d.P,
                                        with_pooled, cl);
      }
    });
  }
  return finish_cam_fwd(o, d, with_pooled);
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define ICAKD_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ICAKD_TARGET_CLONES
#endif

// grad_features of one image ([K, H*W], the layout the CUDA kernel and the fake kernel give too):
// out[k, p] = w[k] g_s[p] + g_p[k] pool_w[p]; a missing term is zero. It does not read the features.
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void outer2_image(const acc_t* u, const acc_t* x, const acc_t* v, const acc_t* y,
                                                          scalar_t* out, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* o = out + r * n;
    const acc_t ur = u && x ? u[r] : acc_t(0);
    const acc_t vr = v && y ? v[r] : acc_t(0);
    if (u && x && v && y) {
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(ur * x[j] + vr * y[j]);
    } else if (u && x) {
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(ur * x[j]);
    } else if (v && y) {
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(vr * y[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(0);
    }
  }
}

ICAKD_TARGET_CLONES
void outer2_image_f32(const float* u, const float* x, const float* v, const float* y, float* out, int64_t rows,
                      int64_t n) {
  outer2_image<float, float>(u, x, v, y, out, rows, n);
}

template <typename scalar_t, typename acc_t>
void cam_bwd_kernel(const scalar_t* A, const acc_t* w, const acc_t* gs, const acc_t* gp, const acc_t* pw,
                    scalar_t* gf, acc_t* gw, int64_t B, int64_t K, int64_t P, bool channels_last) {
  at::parallel_for(0, B, image_grain(K * P), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* wb = w + b * K;
      const acc_t* gsb = gs ? gs + b * P : nullptr;
      const acc_t* gpb = gp ? gp + b * K : nullptr;
      const acc_t* pwb = gp ? pw + b * P : nullptr;
      if (gf) {
        scalar_t* gfb = gf + b * K * P;
        if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
          outer2_image_f32(wb, gsb, gpb, pwb, gfb, K, P);
        } else {
          outer2_image<scalar_t, acc_t>(wb, gsb, gpb, pwb, gfb, K, P);
        }
      }
      if (gw) {
        acc_t* gwb = gw + b * K;
        if (gsb == nullptr) {
          std::fill(gwb, gwb + K, acc_t(0));
        } else if (channels_last) {
          weighted_rows<acc_t, scalar_t>(gsb, A + b * K * P, P, K, gwb);
        } else {
          rows_dot<acc_t, scalar_t>(gsb, A + b * K * P, K, P, gwb);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> cam_bwd_cpu(const std::optional<Tensor>& grad_cam, const std::optional<Tensor>& grad_pooled,
                                       const Tensor& features, const Tensor& weights, const Tensor& cam,
                                       const Tensor& pool_w, bool need_features, bool need_weights) {
  const CamBwdOperands op = check_cam_bwd(grad_cam, grad_pooled, features, weights, cam, pool_w, c10::DeviceType::CPU);
  const CamDims& d = op.d;
  const bool cl = cam_reads_channels_last(features);
  CamBwdOutputs o = alloc_cam_bwd(features, d, need_features, need_weights);
  if (cam_bwd_has_work(d, need_features, need_weights)) {
    // the features are read only for grad_weights (and only where grad_cam is given)
    const bool read_a = need_weights && op.has_gc;
    const Tensor A = read_a ? (cl ? features : features.contiguous()) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "icakd_cam_bwd_cpu", [&] {
      const scalar_t* a = read_a ? A.const_data_ptr<scalar_t>() : nullptr;
      if (d.acc == at::kDouble) {
        cam_bwd_kernel<scalar_t, double>(a, op.w.const_data_ptr<double>(),
                                         op.has_gc ? op.gs.const_data_ptr<double>() : nullptr,
                                         op.has_gp ? op.gp.const_data_ptr<double>() : nullptr,
                                         op.has_gp ? op.pw.const_data_ptr<double>() : nullptr,
                                         need_features ? o.gf.data_ptr<scalar_t>() : nullptr,
                                         need_weights ? o.gw.data_ptr<double>() : nullptr, d.B, d.K, d.P, cl);
      } else {
        cam_bwd_kernel<scalar_t, float>(a, op.w.const_data_ptr<float>(),
                                        op.has_gc ? op.gs.const_data_ptr<float>() : nullptr,
                                        op.has_gp ? op.gp.const_data_ptr<float>() : nullptr,
                                        op.has_gp ? op.pw.const_data_ptr<float>() : nullptr,
                                        need_features ? o.gf.data_ptr<scalar_t>() : nullptr,
                                        need_weights ? o.gw.data_ptr<float>() : nullptr, d.B, d.K, d.P, cl);
      }
    });
  }
  return finish_cam_bwd(o, weights, d, need_features, need_weights);
}

Tensor spatial_mean_cpu(const Tensor& grads) {
  check_spatial_mean(grads, c10::DeviceType::CPU);
  const int64_t B = grads.size(0), K = grads.size(1), P = grads.size(2) * grads.size(3);
  const Tensor g = grads.contiguous();
  Tensor out = at::empty({B, K}, grads.options());
  if (B * K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "icakd_spatial_mean_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = src + r * P;
        const acc_t t = sum_acc<acc_t>(row, P);
        dst[r] = static_cast<scalar_t>(P > 0 ? t / static_cast<acc_t>(P) : std::numeric_limits<acc_t>::quiet_NaN());
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// CAM constraint loss
// ---------------------------------------------------------------------------------------------

void check_cam_pair(const Tensor& cam_s, const Tensor& cam_t) {
  check_float(cam_s, "cam_s");
  check_float(cam_t, "cam_t");
  check_dim(cam_s, 3, "cam_s");
  TORCH_CHECK(cam_t.sizes() == cam_s.sizes(), "cam_t must have the shape of cam_s ", cam_s.sizes(), ", got ",
              cam_t.sizes(), " (maps of different resolutions: use the reference form)");
  check_devices(c10::DeviceType::CPU, {{&cam_s, "cam_s"}, {&cam_t, "cam_t"}});
}

at::ScalarType cam_loss_acc(const Tensor& cam_s, const Tensor& cam_t) {
  return (cam_s.scalar_type() == at::kDouble || cam_t.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// q = x / max(|x|, eps) row by row; returns the norms
template <typename acc_t>
void unit_rows(const acc_t* x, acc_t* q, acc_t* norm, int64_t B, int64_t P, double eps) {
  for (int64_t b = 0; b < B; ++b) {
    const acc_t n = std::sqrt(sumsq_acc<acc_t>(x + b * P, P));
    const acc_t den = std::max<acc_t>(n, static_cast<acc_t>(eps));
    if (norm) norm[b] = n;
    for (int64_t p = 0; p < P; ++p) q[b * P + p] = x[b * P + p] / den;
  }
}

std::tuple<Tensor, Tensor, Tensor> cam_loss_fwd_cpu(const Tensor& cam_s_, const Tensor& cam_t_, double eps) {
  check_cam_pair(cam_s_, cam_t_);
  const auto acc = cam_loss_acc(cam_s_, cam_t_);
  const int64_t B = cam_s_.size(0), P = cam_s_.size(1) * cam_s_.size(2);
  const Tensor cs = cam_s_.to(acc).contiguous();
  const Tensor ct = cam_t_.to(acc).contiguous();
  Tensor q_s = at::empty({B, P}, cs.options());
  Tensor norm_s = at::empty({B}, cs.options());
  Tensor loss = at::empty({}, cs.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "icakd_cam_loss_fwd_cpu", [&] {
    std::vector<scalar_t> q_t(B * P);
    unit_rows<scalar_t>(cs.const_data_ptr<scalar_t>(), q_s.data_ptr<scalar_t>(), norm_s.data_ptr<scalar_t>(), B, P,
                        eps);
    unit_rows<scalar_t>(ct.const_data_ptr<scalar_t>(), q_t.data(), nullptr, B, P, eps);
    const scalar_t* qs = q_s.const_data_ptr<scalar_t>();
    scalar_t total = 0;
    for (int64_t b = 0; b < B; ++b) {
      scalar_t row = 0;
      for (int64_t p = 0; p < P; ++p) {
        const scalar_t d = qs[b * P + p] - q_t[b * P + p];
        row += d * d;
      }
      total += row;
    }
    loss.fill_(total / static_cast<scalar_t>(std::max<int64_t>(B, 1)));
  });
  return {loss, q_s, norm_s};
}

// d = 2 g (q_s - q_t) / B; through q = x / max(|x|, eps): (d - q (q . d)) / |x| where |x| > eps,
// d / eps elsewhere
Tensor cam_loss_bwd_cpu(const Tensor& grad_out, const Tensor& cam_s, const Tensor& cam_t_, const Tensor& q_s_,
                        const Tensor& norm_s_, double eps) {
  check_devices(c10::DeviceType::CPU, {{&grad_out, "grad_out"}, {&cam_s, "cam_s"}, {&cam_t_, "cam_t"},
                                       {&q_s_, "q_s"}, {&norm_s_, "norm_s"}});
  check_cam_pair(cam_s, cam_t_);
  check_float(grad_out, "grad_out");
  check_one_element(grad_out, "grad_out");
  const auto acc = cam_loss_acc(cam_s, cam_t_);
  const int64_t B = cam_s.size(0), P = cam_s.size(1) * cam_s.size(2);
  TORCH_CHECK(q_s_.dim() == 2 && q_s_.size(0) == B && q_s_.size(1) == P, "q_s must be [B, H*W] = [", B, ", ", P,
              "], got ", q_s_.sizes());
  TORCH_CHECK(norm_s_.dim() == 1 && norm_s_.size(0) == B, "norm_s must be [B] = [", B, "], got ", norm_s_.sizes());
  const Tensor ct = cam_t_.to(acc).contiguous();
  const Tensor q_s = q_s_.to(acc).contiguous();
  const Tensor norm_s = norm_s_.to(acc).contiguous();
  Tensor out = at::empty({B, P}, q_s.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "icakd_cam_loss_bwd_cpu", [&] {
    const scalar_t g = static_cast<scalar_t>(grad_out.item<double>());
    const scalar_t scale = 2 * g / static_cast<scalar_t>(std::max<int64_t>(B, 1));
    std::vector<scalar_t> q_t(B * P);
    unit_rows<scalar_t>(ct.const_data_ptr<scalar_t>(), q_t.data(), nullptr, B, P, eps);
    const scalar_t* qs = q_s.const_data_ptr<scalar_t>();
    const scalar_t* ns = norm_s.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* q = qs + b * P;
      scalar_t* ob = o + b * P;
      scalar_t qd = 0;
      for (int64_t p = 0; p < P; ++p) {
        ob[p] = scale * (q[p] - q_t[b * P + p]);
        qd += q[p] * ob[p];
      }
      if (ns[b] > static_cast<scalar_t>(eps)) {
        for (int64_t p = 0; p < P; ++p) ob[p] = (ob[p] - q[p] * qd) / ns[b];
      } else {
        for (int64_t p = 0; p < P; ++p) ob[p] = ob[p] / static_cast<scalar_t>(eps);
      }
    }
  });
  return out.view(cam_s.sizes()).to(cam_s.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(icakd_fast_C, CPU, m) {
  m.impl("cam_fwd", &cam_fwd_cpu);
  m.impl("cam_bwd", &cam_bwd_cpu);
  m.impl("spatial_mean", &spatial_mean_cpu);
  m.impl("cam_loss_fwd", &cam_loss_fwd_cpu);
  m.impl("cam_loss_bwd", &cam_loss_bwd_cpu);
}

}  // namespace icakd
