// Runs the vectorised CUDA CAM kernels (csrc/cuda/cam_vec_kernels.cuh) on a CPU through
// cuda_emu.h and checks them against a float64 computation of the same math, for float32,
// float16 and bfloat16 maps over shapes that cover every branch of the index plan: H*W = V,
// 7x7, odd sizes, several channel splits, H*W = 512, blocks padded to whole warps, and each
// backward with a subset of its inputs and outputs. Built and run by tests/test_cuda_emulated.py.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda_emu.h"
#include "cam_vec_kernels.cuh"

#include <cstdio>
#include <vector>

using icakd::cam_vec_bwd_kernel;
using icakd::cam_vec_grid;
using icakd::cam_vec_partial_kernel;
using icakd::cam_vec_pool_kernel;
using icakd::VecGrid;

static int failures = 0;
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float uniform() {  // in [-1, 1)
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<float>((rng_state >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static void expect_close(const char* what, const char* type, int B, int K, int P, const std::vector<double>& want,
                         const std::vector<float>& got, double rtol) {
  double scale = 1.0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    if (!(err <= rtol * (std::fabs(want[i]) + 1e-3 * scale))) {
      if (failures < 20)
        std::printf("FAIL %s %s B=%d K=%d P=%d at %zu: got %.7g want %.7g\n", what, type, B, K, P, i, got[i], want[i]);
      ++failures;
      return;
    }
  }
}

template <typename T, int V>
void check(const char* type, int B, int K, int P, double out_rtol) {
  const VecGrid g = cam_vec_grid(K, P, V);
  const int S = static_cast<int>(g.splits);
  std::vector<T> A(static_cast<size_t>(B) * K * P);
  std::vector<float> w(B * K), gc(B * P), gp(B * K);
  for (auto& a : A) a = static_cast<T>(uniform());
  for (auto& x : w) x = uniform() / P;
  for (auto& x : gc) x = uniform();
  for (auto& x : gp) x = uniform();
  auto a = [&](int b, int k, int p) { return static_cast<double>(static_cast<float>(A[(static_cast<size_t>(b) * K + k) * P + p])); };

  // forward, twice (bit-identical), and once without pooling
  std::vector<float> part(B * S * P), cam(B * P), pool_w(B * P), pooled(B * K);
  std::vector<float> cam2(B * P), pool_w2(B * P), pooled2(B * K), cam3(B * P);
  const size_t smem_pool = sizeof(float) * (2 * P + g.gps * P * 2);
  for (int rep = 0; rep < 2; ++rep) {
    cuda_emu::launch(cam_vec_partial_kernel<T, V>, dim3(B, S), dim3(g.threads), sizeof(float) * g.R * V * P, A.data(),
                     w.data(), part.data(), int64_t(K), P, g.gps, g.R);
    cuda_emu::launch(cam_vec_pool_kernel<T, V>, dim3(B, S), dim3(g.threads), smem_pool, A.data(),
                     static_cast<const float*>(part.data()), (rep ? cam2 : cam).data(),
                     (rep ? pool_w2 : pool_w).data(), (rep ? pooled2 : pooled).data(), int64_t(K), P, g.gps, g.R,
                     int64_t(S));
  }
  cuda_emu::launch(cam_vec_pool_kernel<T, V>, dim3(B, 1), dim3(g.threads), sizeof(float) * 2 * P, A.data(),
                   static_cast<const float*>(part.data()), cam3.data(), static_cast<float*>(nullptr),
                   static_cast<float*>(nullptr), int64_t(K), P, g.gps, g.R, int64_t(S));
  if (cam != cam2 || pool_w != pool_w2 || pooled != pooled2 || cam != cam3) {
    std::printf("FAIL forward not reproducible (or cam differs without pooling) %s B=%d K=%d P=%d\n", type, B, K, P);
    ++failures;
  }
  std::vector<double> rcam(B * P), rpw(B * P), rpooled(B * K);
  for (int b = 0; b < B; ++b) {
    double lo = 1e300, hi = -1e300, msum = 0;
    for (int p = 0; p < P; ++p) {
      double s = 0;
      for (int k = 0; k < K; ++k) s += w[b * K + k] * a(b, k, p);
      rcam[b * P + p] = s > 0 ? s : 0;
      lo = std::min(lo, rcam[b * P + p]);
      hi = std::max(hi, rcam[b * P + p]);
    }
    for (int p = 0; p < P; ++p) msum += (rcam[b * P + p] - lo) / (hi - lo + 1e-7);
    for (int p = 0; p < P; ++p) rpw[b * P + p] = msum > 0 ? (rcam[b * P + p] - lo) / (hi - lo + 1e-7) / msum : 1.0 / P;
    for (int k = 0; k < K; ++k) {
      double s = 0;
      for (int p = 0; p < P; ++p) s += rpw[b * P + p] * a(b, k, p);
      rpooled[b * K + k] = s;
    }
  }
  expect_close("cam", type, B, K, P, rcam, cam, 1e-3);
  expect_close("pool_w", type, B, K, P, rpw, pool_w, 1e-3);
  expect_close("pooled", type, B, K, P, rpooled, pooled, 1e-3);

  // backward from the forward's own cam / pool_w: every subset of inputs and outputs
  std::vector<float> gs(B * P);
  for (int i = 0; i < B * P; ++i) gs[i] = cam[i] > 0 ? gc[i] : 0.f;
  for (int has_gs = 0; has_gs < 2; ++has_gs)
    for (int has_gp = 0; has_gp < 2; ++has_gp)
      for (int outs = 1; outs < 4; ++outs) {  // 1: grad_features, 2: grad_weights, 3: both
        std::vector<T> gf(A.size(), static_cast<T>(12345.f));
        std::vector<float> gw(B * K, 12345.f);
        const bool need_f = outs & 1, need_w = outs & 2;
        cuda_emu::launch(cam_vec_bwd_kernel<T, V>, dim3(B, S), dim3(g.threads),
                         need_w ? sizeof(float) * g.gps * P * 2 : 0, static_cast<const T*>(A.data()),
                         static_cast<const float*>(w.data()), has_gs ? static_cast<const float*>(gs.data()) : nullptr,
                         has_gp ? static_cast<const float*>(gp.data()) : nullptr,
                         has_gp ? static_cast<const float*>(pool_w.data()) : nullptr, need_f ? gf.data() : nullptr,
                         need_w ? gw.data() : nullptr, int64_t(K), P, g.gps, g.R);
        if (need_f) {
          std::vector<double> want(A.size());
          std::vector<float> got(A.size());
          for (int b = 0; b < B; ++b)
            for (int k = 0; k < K; ++k)
              for (int p = 0; p < P; ++p) {
                const size_t i = (static_cast<size_t>(b) * K + k) * P + p;
                want[i] = (has_gs ? double(gs[b * P + p]) * w[b * K + k] : 0.0) +
                          (has_gp ? double(gp[b * K + k]) * pool_w[b * P + p] : 0.0);
                got[i] = static_cast<float>(gf[i]);
              }
          expect_close(has_gs ? (has_gp ? "grad_features" : "grad_features (no grad_pooled)")
                              : (has_gp ? "grad_features (no grad_cam)" : "grad_features (no grads)"),
                       type, B, K, P, want, got, out_rtol);
        }
        if (need_w) {
          std::vector<double> want(B * K, 0.0);
          for (int b = 0; b < B; ++b)
            for (int k = 0; k < K; ++k)
              for (int p = 0; p < P; ++p)
                if (has_gs) want[b * K + k] += double(gs[b * P + p]) * a(b, k, p);
          expect_close(has_gs ? "grad_weights" : "grad_weights (no grad_cam)", type, B, K, P, want, gw, 1e-3);
        }
      }
}

int main() {
  // (B, K, P): P = V; 7x7; P = 9 with one group; several splits at 7x7; 4x4; P = 512 (R = 1);
  // P = 100 (R = 2, 200 threads padded to 224)
  const int shapes[][3] = {{2, 16, 8}, {3, 64, 49}, {2, 8, 9}, {2, 528, 49}, {2, 40, 16}, {1, 24, 512}, {2, 16, 100}};
  int cases = 0;
  for (const auto& s : shapes) {
    check<float, 4>("float32", s[0], s[1], s[2], 1e-5);
    check<c10::Half, 8>("float16", s[0], s[1], s[2], 2e-3);
    check<c10::BFloat16, 8>("bfloat16", s[0], s[1], s[2], 1e-2);
    cases += 3;
  }
  check<float, 4>("float32", 2, 12, 7, 1e-5);  // V = 4 <= P = 7 < 8
  ++cases;
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
