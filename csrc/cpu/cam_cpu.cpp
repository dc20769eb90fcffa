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
//
// class_activation_fwd / class_activation_bwd (one network's CAM step, one op each way) call these
// kernels and the CAM loss's loops below; they gather the classifier rows, and scatter their
// gradient, in plain loops.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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

// cam_fwd's kernels on checked operands: A the features as the kernels read them (contiguous NCHW or
// channels_last), w [B, K] in the accumulation dtype acc_t, o allocated by alloc_cam_fwd
template <typename acc_t>
void run_cam_fwd(const Tensor& A, const acc_t* w, CamFwdOutputs& o, const CamDims& d, bool with_pooled, bool cl) {
  if (d.B == 0 || d.P == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "icakd_cam_fwd_cpu", [&] {
    cam_fwd_kernel<scalar_t, acc_t>(A.const_data_ptr<scalar_t>(), w, o.cam.data_ptr<acc_t>(),
                                    with_pooled ? o.pooled.data_ptr<acc_t>() : nullptr,
                                    with_pooled ? o.pool_w.data_ptr<acc_t>() : nullptr, d.B, d.K, d.P, with_pooled,
                                    cl);
  });
}

std::tuple<Tensor, Tensor, Tensor> cam_fwd_cpu(const Tensor& features, const Tensor& weights, bool with_pooled) {
  const CamDims d = check_cam(features, weights, c10::DeviceType::CPU);
  const bool cl = cam_reads_channels_last(features);
  const Tensor A = cl ? features : features.contiguous();
  const Tensor w = weights.to(d.acc).contiguous();
  CamFwdOutputs o = alloc_cam_fwd(features, d, with_pooled);
  if (d.acc == at::kDouble) {
    run_cam_fwd<double>(A, w.const_data_ptr<double>(), o, d, with_pooled, cl);
  } else {
    run_cam_fwd<float>(A, w.const_data_ptr<float>(), o, d, with_pooled, cl);
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
      const acc_t* wb = w ? w + b * K : nullptr;
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

// cam_bwd's kernels on checked operands ([B, *] rows in the accumulation dtype acc_t; a null pointer
// is a missing term): A the features as the kernels read them (undefined when grad_weights is not
// asked for), gf [B, K, H, W] contiguous in the dtype of features (undefined: not asked for)
template <typename acc_t>
void run_cam_bwd(at::ScalarType feature_type, const Tensor& A, const acc_t* w, const acc_t* gs, const acc_t* gp,
                 const acc_t* pw, const Tensor& gf, acc_t* gw, const CamDims& d, bool cl) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feature_type, "icakd_cam_bwd_cpu", [&] {
    const scalar_t* a = A.defined() ? A.const_data_ptr<scalar_t>() : nullptr;
    cam_bwd_kernel<scalar_t, acc_t>(a, w, gs, gp, pw, gf.defined() ? gf.data_ptr<scalar_t>() : nullptr, gw, d.B, d.K,
                                    d.P, cl);
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
    const Tensor gf = need_features ? o.gf : Tensor();
    AT_DISPATCH_FLOATING_TYPES(d.acc, "icakd_cam_bwd_cpu", [&] {
      run_cam_bwd<scalar_t>(features.scalar_type(), A, op.w.const_data_ptr<scalar_t>(),
                            op.has_gc ? op.gs.const_data_ptr<scalar_t>() : nullptr,
                            op.has_gp ? op.gp.const_data_ptr<scalar_t>() : nullptr,
                            op.has_gp ? op.pw.const_data_ptr<scalar_t>() : nullptr, gf,
                            need_weights ? o.gw.data_ptr<scalar_t>() : nullptr, d, cl);
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
  return acc_type_of(cam_s.scalar_type(), cam_t.scalar_type());
}

// Fills q_s, norm_s and q_t (the unit rows of both maps, as F.normalize) and returns
// mean_b |q_s[b] - q_t[b]|^2
template <typename acc_t>
acc_t cam_loss_rows(const acc_t* cs, const acc_t* ct, int64_t B, int64_t P, double eps, acc_t* q_s, acc_t* norm_s,
                    acc_t* q_t) {
  acc_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    acc_t* qs = q_s + b * P;
    acc_t* qt = q_t + b * P;
    norm_s[b] = unit_row<acc_t>(cs + b * P, P, eps, qs);
    unit_row<acc_t>(ct + b * P, P, eps, qt);
    acc_t row = 0;
    for (int64_t p = 0; p < P; ++p) {
      const acc_t d = qs[p] - qt[p];
      row += d * d;
    }
    total += row;
  }
  return total / static_cast<acc_t>(std::max<int64_t>(B, 1));
}

// One row of dL/dcam_s: d = scale (q_s - q_t) with scale = 2 grad_out / B; through
// q = x / max(|x|, eps): (d - q (q . d)) / |x| where |x| > eps, d / eps elsewhere
template <typename acc_t>
inline void cam_loss_grad_row(acc_t scale, const acc_t* q, const acc_t* qt, acc_t norm, int64_t P, double eps,
                              acc_t* out) {
  acc_t qd = 0;
  for (int64_t p = 0; p < P; ++p) {
    out[p] = scale * (q[p] - qt[p]);
    qd += q[p] * out[p];
  }
  if (norm > static_cast<acc_t>(eps)) {
    for (int64_t p = 0; p < P; ++p) out[p] = (out[p] - q[p] * qd) / norm;
  } else {
    for (int64_t p = 0; p < P; ++p) out[p] = out[p] / static_cast<acc_t>(eps);
  }
}

template <typename acc_t>
acc_t cam_loss_scale(double grad_out, int64_t B) {
  const acc_t g = static_cast<acc_t>(grad_out);
  return 2 * g / static_cast<acc_t>(std::max<int64_t>(B, 1));
}

struct CamLoss {
  Tensor loss, q_s, norm_s, q_t;
};

// cam_loss_fwd of checked maps of one shape, with the teacher's unit rows q_t
CamLoss cam_loss_compute(const Tensor& cam_s, const Tensor& cam_t, double eps) {
  const auto acc = cam_loss_acc(cam_s, cam_t);
  const int64_t B = cam_s.size(0), P = cam_s.size(1) * cam_s.size(2);
  const Tensor cs = cam_s.to(acc).contiguous();
  const Tensor ct = cam_t.to(acc).contiguous();
  CamLoss l;
  l.q_s = at::empty({B, P}, cs.options());
  l.norm_s = at::empty({B}, cs.options());
  l.q_t = at::empty({B, P}, cs.options());
  l.loss = at::empty({}, cs.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "icakd_cam_loss_fwd_cpu", [&] {
    *l.loss.data_ptr<scalar_t>() =
        cam_loss_rows<scalar_t>(cs.const_data_ptr<scalar_t>(), ct.const_data_ptr<scalar_t>(), B, P, eps,
                                l.q_s.data_ptr<scalar_t>(), l.norm_s.data_ptr<scalar_t>(), l.q_t.data_ptr<scalar_t>());
  });
  return l;
}

std::tuple<Tensor, Tensor, Tensor> cam_loss_fwd_cpu(const Tensor& cam_s, const Tensor& cam_t, double eps) {
  check_cam_pair(cam_s, cam_t);
  CamLoss l = cam_loss_compute(cam_s, cam_t, eps);
  return {l.loss, l.q_s, l.norm_s};
}

// The teacher's unit rows are not an input: each is normalised again, one row at a time, just
// before the row of the gradient that reads it.
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
    const scalar_t scale = cam_loss_scale<scalar_t>(grad_out.item<double>(), B);
    std::vector<scalar_t> q_t(P);
    const scalar_t* qs = q_s.const_data_ptr<scalar_t>();
    const scalar_t* ctp = ct.const_data_ptr<scalar_t>();
    const scalar_t* ns = norm_s.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      unit_row<scalar_t>(ctp + b * P, P, eps, q_t.data());
      cam_loss_grad_row<scalar_t>(scale, qs + b * P, q_t.data(), ns[b], P, eps, o + b * P);
    }
  });
  return out.view(cam_s.sizes()).to(cam_s.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// one network's CAM step: Grad-CAM weights of a GAP + linear head, map, pooled features and CAM
// constraint in one op each way
// ---------------------------------------------------------------------------------------------

// features [B, K, H, W], fc_weight [C, K], targets [B] int64 (metadata only)
CamDims check_head(const Tensor& features, const Tensor& fc_weight, const Tensor& targets) {
  check_float(features, "features");
  check_dim(features, 4, "features");
  check_float(fc_weight, "fc_weight");
  check_dim(fc_weight, 2, "fc_weight");
  TORCH_CHECK(fc_weight.size(1) == features.size(1), "fc_weight must be [C, K] with K = ", features.size(1),
              " (the channels of features), got shape ", fc_weight.sizes());
  check_dtype(targets, at::kLong, "targets");
  check_vector(targets, features.size(0), "targets", "B");
  return cam_dims(features, fc_weight);
}

// w[b] = fc_weight[targets[b]] / (H*W), divided and rounded in fc_weight's dtype as
// reference.cam_weights_from_linear does, then widened to acc_t (fc: contiguous [C, K])
template <typename acc_t>
void gather_head_weights(const Tensor& fc, const int64_t* targets, const CamDims& d, acc_t* w) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fc.scalar_type(), "icakd_class_activation_weights", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* f = fc.const_data_ptr<scalar_t>();
    const op_t den = static_cast<op_t>(d.P);
    for (int64_t b = 0; b < d.B; ++b) {
      const scalar_t* row = f + targets[b] * d.K;
      acc_t* wb = w + b * d.K;
      for (int64_t k = 0; k < d.K; ++k) {
        wb[k] = static_cast<acc_t>(static_cast<scalar_t>(static_cast<op_t>(row[k]) / den));
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> class_activation_fwd_cpu(
    const Tensor& features, const Tensor& fc_weight, const Tensor& targets, const std::optional<Tensor>& cam_t,
    double eps) {
  const CamDims d = check_head(features, fc_weight, targets);
  const bool has_t = cam_t.has_value() && cam_t->defined();
  if (has_t) {
    check_float(*cam_t, "cam_t");
    TORCH_CHECK(cam_t->dim() == 3 && cam_t->size(0) == d.B && cam_t->size(1) == d.H && cam_t->size(2) == d.W,
                "cam_t must be [B, H, W] = [", d.B, ", ", d.H, ", ", d.W, "], got shape ", cam_t->sizes());
  }
  const Tensor none;
  check_devices(c10::DeviceType::CPU, {{&features, "features"},
                                       {&fc_weight, "fc_weight"},
                                       {&targets, "targets"},
                                       {has_t ? &*cam_t : &none, "cam_t"}});
  check_index_range(targets, 0, fc_weight.size(0), "targets");
  const bool cl = cam_reads_channels_last(features);
  const Tensor A = cl ? features : features.contiguous();
  const Tensor fc = fc_weight.contiguous();
  const Tensor tg = targets.contiguous();
  CamFwdOutputs o = alloc_cam_fwd(features, d, true);
  if (d.B > 0 && d.P > 0) {
    AT_DISPATCH_FLOATING_TYPES(d.acc, "icakd_class_activation_fwd_cpu", [&] {
      std::vector<scalar_t> w(d.B * d.K);
      gather_head_weights<scalar_t>(fc, tg.const_data_ptr<int64_t>(), d, w.data());
      run_cam_fwd<scalar_t>(A, w.data(), o, d, true, cl);
    });
  }
  auto [cam, pooled, pool_w] = finish_cam_fwd(o, d, true);
  if (!has_t) {
    const auto opts = features.options().dtype(d.acc);
    return {cam, pooled, at::empty({0}, opts), pool_w, at::empty({0}, opts), at::empty({0}, opts),
            at::empty({0}, opts)};
  }
  // the loss reads the map as cam_loss_fwd would (in cam's dtype)
  CamLoss l = cam_loss_compute(cam, *cam_t, eps);
  return {cam, pooled, l.loss, pool_w, l.q_s, l.norm_s, l.q_t};
}

double one_value(const Tensor& t) {
  double v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "icakd_one_value",
                                  [&] { v = static_cast<double>(*t.const_data_ptr<scalar_t>()); });
  return v;
}

// dL/dcam of the CAM constraint from the saved unit rows, rounded to cam's dtype (as cam_loss_bwd's
// output is), then through the relu (times cam > 0): [B, H*W] in the accumulation dtype
Tensor class_activation_grad_cam(const Tensor& grad_loss, const Tensor& cam, const Tensor& q_s_,
                                 const Tensor& norm_s_, const Tensor& q_t_, double eps, const CamDims& d) {
  const auto lacc = acc_type_of(q_s_.scalar_type(), q_t_.scalar_type());
  const Tensor q_s = q_s_.to(lacc).contiguous();
  const Tensor q_t = q_t_.to(lacc).contiguous();
  const Tensor norm_s = norm_s_.to(lacc).contiguous();
  const double g = one_value(grad_loss);
  Tensor grad = at::empty({d.B, d.P}, q_s.options());
  AT_DISPATCH_FLOATING_TYPES(lacc, "icakd_class_activation_grad_cam", [&] {
    const scalar_t scale = cam_loss_scale<scalar_t>(g, d.B);
    const scalar_t* qs = q_s.const_data_ptr<scalar_t>();
    const scalar_t* qt = q_t.const_data_ptr<scalar_t>();
    const scalar_t* ns = norm_s.const_data_ptr<scalar_t>();
    scalar_t* o = grad.data_ptr<scalar_t>();
    for (int64_t b = 0; b < d.B; ++b) {
      cam_loss_grad_row<scalar_t>(scale, qs + b * d.P, qt + b * d.P, ns[b], d.P, eps, o + b * d.P);
    }
  });
  Tensor gs = grad.to(cam.scalar_type()).to(d.acc).contiguous();
  const Tensor c = cam.reshape({d.B, d.P}).to(d.acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(d.acc, "icakd_class_activation_relu", [&] {
    scalar_t* o = gs.data_ptr<scalar_t>();
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < d.B * d.P; ++i) o[i] *= cp[i] > scalar_t(0) ? scalar_t(1) : scalar_t(0);
  });
  return gs;
}

std::tuple<Tensor, Tensor> class_activation_bwd_cpu(const std::optional<Tensor>& grad_pooled,
                                                    const std::optional<Tensor>& grad_loss, const Tensor& features,
                                                    const Tensor& fc_weight, const Tensor& targets, const Tensor& cam,
                                                    const Tensor& pool_w, const Tensor& q_s, const Tensor& norm_s,
                                                    const Tensor& q_t, double eps, bool need_features,
                                                    bool need_fc_weight) {
  const CamDims d = check_head(features, fc_weight, targets);
  const bool has_gp = grad_pooled.has_value() && grad_pooled->defined();
  const bool has_gl = grad_loss.has_value() && grad_loss->defined();
  check_defined(cam, "cam");
  check_defined(pool_w, "pool_w");
  check_defined(q_s, "q_s");
  check_defined(norm_s, "norm_s");
  check_defined(q_t, "q_t");
  const Tensor none;
  check_devices(c10::DeviceType::CPU, {{&features, "features"},
                                       {&fc_weight, "fc_weight"},
                                       {&targets, "targets"},
                                       {has_gp ? &*grad_pooled : &none, "grad_pooled"},
                                       {has_gl ? &*grad_loss : &none, "grad_loss"},
                                       {&cam, "cam"},
                                       {&pool_w, "pool_w"},
                                       {&q_s, "q_s"},
                                       {&norm_s, "norm_s"},
                                       {&q_t, "q_t"}});
  if (has_gp) check_pooled_grad(*grad_pooled, pool_w, d);
  if (has_gl) {
    check_float(*grad_loss, "grad_loss");
    check_one_element(*grad_loss, "grad_loss");
    check_float(cam, "cam");
    TORCH_CHECK(cam.numel() == d.B * d.P, "cam must be [B, H, W] = [", d.B, ", ", d.H, ", ", d.W, "], got shape ",
                cam.sizes());
    check_float(q_s, "q_s");
    check_float(norm_s, "norm_s");
    check_float(q_t, "q_t");
    TORCH_CHECK(q_s.dim() == 2 && q_s.size(0) == d.B && q_s.size(1) == d.P, "q_s must be [B, H*W] = [", d.B, ", ",
                d.P, "], got shape ", q_s.sizes());
    TORCH_CHECK(norm_s.dim() == 1 && norm_s.size(0) == d.B, "norm_s must be [B] = [", d.B, "], got shape ",
                norm_s.sizes());
    TORCH_CHECK(q_t.dim() == 2 && q_t.size(0) == d.B && q_t.size(1) == d.P, "q_t must be [B, H*W] = [", d.B, ", ",
                d.P, "], got shape ", q_t.sizes());
  }
  const int64_t C = fc_weight.size(0);
  check_index_range(targets, 0, C, "targets");

  const bool cl = cam_reads_channels_last(features);
  // the weights' gradient comes from the map's gradient only (the pooling weights are a constant)
  const bool weights_grad = need_fc_weight && has_gl;
  Tensor gf = need_features ? at::empty({d.B, d.K, d.H, d.W}, features.options()) : at::empty({0}, features.options());
  Tensor gfc;
  const Tensor tg = targets.contiguous();
  const int64_t* t = tg.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(d.acc, "icakd_class_activation_bwd_cpu", [&] {
    using acc_t = scalar_t;
    const Tensor gs = has_gl ? class_activation_grad_cam(*grad_loss, cam, q_s, norm_s, q_t, eps, d) : Tensor();
    const Tensor gp = has_gp ? grad_pooled->reshape({d.B, d.K}).to(d.acc).contiguous() : Tensor();
    const Tensor pw = has_gp ? pool_w.reshape({d.B, d.P}).to(d.acc).contiguous() : Tensor();
    // the weights again, from the classifier rows (grad_features' term of the map's gradient)
    std::vector<acc_t> w(need_features ? d.B * d.K : 0);
    if (need_features) gather_head_weights<acc_t>(fc_weight.contiguous(), t, d, w.data());
    std::vector<acc_t> gw(weights_grad ? d.B * d.K : 0, acc_t(0));
    if ((need_features || weights_grad) && d.B * d.K * d.P > 0) {
      const Tensor A = weights_grad ? (cl ? features : features.contiguous()) : Tensor();
      run_cam_bwd<acc_t>(features.scalar_type(), A, need_features ? w.data() : nullptr,
                         has_gl ? gs.const_data_ptr<acc_t>() : nullptr, has_gp ? gp.const_data_ptr<acc_t>() : nullptr,
                         has_gp ? pw.const_data_ptr<acc_t>() : nullptr, need_features ? gf : Tensor(),
                         weights_grad ? gw.data() : nullptr, d, cl);
    }
    if (need_fc_weight) {
      // scatter-add of grad_weights / (H*W) into the rows of targets, in batch order
      Tensor acc_fc = at::empty({C, d.K}, features.options().dtype(d.acc));
      acc_t* o = acc_fc.data_ptr<acc_t>();
      std::fill(o, o + C * d.K, acc_t(0));
      if (weights_grad) {
        const acc_t den = static_cast<acc_t>(d.P);
        for (int64_t b = 0; b < d.B; ++b) {
          acc_t* row = o + t[b] * d.K;
          const acc_t* g = gw.data() + b * d.K;
          for (int64_t k = 0; k < d.K; ++k) row[k] += g[k] / den;
        }
      }
      gfc = acc_fc.to(fc_weight.scalar_type());
    }
  });
  return {gf, need_fc_weight ? gfc : at::empty({0}, fc_weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(icakd_fast_C, CPU, m) {
  m.impl("cam_fwd", &cam_fwd_cpu);
  m.impl("cam_bwd", &cam_bwd_cpu);
  m.impl("spatial_mean", &spatial_mean_cpu);
  m.impl("cam_loss_fwd", &cam_loss_fwd_cpu);
  m.impl("cam_loss_bwd", &cam_loss_bwd_cpu);
  m.impl("class_activation_fwd", &class_activation_fwd_cpu);
  m.impl("class_activation_bwd", &class_activation_bwd_cpu);
}

}  // namespace icakd
