// Runs the CUDA memory-bank kernels (csrc/cuda/bank_kernels.cuh) on a CPU through cuda_emu.h and
// compares them bit for bit with a sequential C++ statement of the same semantics: several class
// bank enqueues (wrap-around, more rows of a class than slots, masked rows, labels outside
// [0, C)), the resync, the FIFO enqueue + pointer and the segment sums, for a float32 and a
// bfloat16 bank. Built and run by tests/test_cuda_emulated.py.
#include <c10/util/BFloat16.h>

#include "cuda_emu.h"
#include "bank_kernels.cuh"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <vector>

static int failures = 0;
static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t next_u() {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return rng_state >> 33;
}
static float uniform() { return static_cast<float>(next_u() & 0xffffff) / 8388608.0f - 1.0f; }

constexpr unsigned int kThreads = 256;

template <typename V>
static void expect_equal(const char* what, const char* type, int step, const std::vector<V>& got, const std::vector<V>& want) {
  if (got.size() != want.size() || std::memcmp(got.data(), want.data(), sizeof(V) * got.size()) != 0) {
    if (failures < 20) std::printf("FAIL %s (%s bank, enqueue %d) differs from the sequential statement\n", what, type, step);
    ++failures;
  }
}

template <typename T>
void class_bank(const char* type, int64_t C, int64_t S, int64_t D, int64_t N, int steps) {
  std::vector<T> bank(C * S * D, static_cast<T>(0.f)), rbank = bank;
  std::vector<int64_t> count(C, 0), ptr(C, 0), rcount = count, rptr = ptr;
  std::vector<float> sums(C * D, 0.f), rsums = sums;
  for (int step = 0; step < steps; ++step) {
    std::vector<T> feats(N * D);
    std::vector<int64_t> labels(N);
    std::vector<unsigned char> mask_bytes(N);
    for (auto& f : feats) f = static_cast<T>(uniform());
    for (int64_t i = 0; i < N; ++i) {
      const uint64_t u = next_u();
      labels[i] = (u % 11 == 0) ? (u % 2 ? -1 : C) : static_cast<int64_t>(u % (C > 3 ? 3 : C));  // few classes: many rows each
      mask_bytes[i] = (next_u() % 5) != 0;
    }
    bool mask[4096];
    for (int64_t i = 0; i < N; ++i) mask[i] = mask_bytes[i];
    cuda_emu::launch(icakd::class_enqueue_kernel<T>, dim3(N), dim3(kThreads), 0, bank.data(), count.data(), ptr.data(),
                     sums.data(), static_cast<const T*>(feats.data()), static_cast<const int64_t*>(labels.data()),
                     static_cast<const bool*>(mask), N, C, S, D);
    // the statement: per class, its kept rows in batch order; the last S of them go to the slots
    // after ptr; sums += new - old for a replaced slot, += new for an empty one
    for (int64_t c = 0; c < C; ++c) {
      std::vector<int64_t> rows;
      for (int64_t i = 0; i < N; ++i)
        if (mask[i] && labels[i] == c) rows.push_back(i);
      const int64_t n = static_cast<int64_t>(rows.size()), skip = n > S ? n - S : 0, p0 = rptr[c], filled = rcount[c];
      for (int64_t r = skip; r < n; ++r) {
        const int64_t slot = (p0 + r - skip) % S;
        for (int64_t d = 0; d < D; ++d) {
          T& dst = rbank[(c * S + slot) * D + d];
          const T nv = feats[rows[r] * D + d];
          rsums[c * D + d] += slot < filled ? static_cast<float>(nv) - static_cast<float>(dst) : static_cast<float>(nv);
          dst = nv;
        }
      }
      rptr[c] = (p0 + std::min(n, S)) % S;
      rcount[c] = std::min(filled + n, S);
    }
    expect_equal("class bank rows", type, step, bank, rbank);
    expect_equal("class bank sums", type, step, sums, rsums);
    expect_equal("class bank count", type, step, count, rcount);
    expect_equal("class bank ptr", type, step, ptr, rptr);
  }
  // resync of every class (and an out-of-range class index, which is skipped)
  std::vector<int64_t> classes(C + 1);
  std::iota(classes.begin(), classes.end(), 0);
  classes[C] = C;
  std::vector<float> resynced(C * D, -7.f), want(C * D, 0.f);
  cuda_emu::launch(icakd::class_resync_kernel<T>, dim3(C + 1, (D + kThreads - 1) / kThreads), dim3(kThreads), 0,
                   static_cast<const T*>(bank.data()), static_cast<const int64_t*>(count.data()), resynced.data(),
                   static_cast<const int64_t*>(classes.data()), C, S, D);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t d = 0; d < D; ++d) {
      float acc = 0.f;
      for (int64_t s = 0; s < rcount[c]; ++s) acc += static_cast<float>(rbank[(c * S + s) * D + d]);
      want[c * D + d] = acc;
    }
  expect_equal("class bank resync", type, steps, resynced, want);
}

template <typename T>
void fifo_bank(const char* type, int64_t Nb, int64_t D, int64_t M, int steps) {
  std::vector<T> bank(Nb * D, static_cast<T>(0.f)), rbank = bank;
  std::vector<int64_t> bank_labels(Nb, -1), rlabels = bank_labels, ptr(1, 0), rptr = ptr;
  for (int step = 0; step < steps; ++step) {
    std::vector<T> feats(M * D);
    std::vector<int64_t> labels(M);
    bool mask[4096];
    for (auto& f : feats) f = static_cast<T>(uniform());
    for (int64_t i = 0; i < M; ++i) {
      labels[i] = (next_u() % 7 == 0) ? -1 : static_cast<int64_t>(next_u() % 5);
      mask[i] = (next_u() % 4) != 0;
    }
    cuda_emu::launch(icakd::fifo_enqueue_kernel<T>, dim3(M), dim3(kThreads), 0, bank.data(), bank_labels.data(),
                     static_cast<const int64_t*>(ptr.data()), static_cast<const T*>(feats.data()),
                     static_cast<const int64_t*>(labels.data()), static_cast<const bool*>(mask), M, Nb, D);
    cuda_emu::launch(icakd::fifo_ptr_kernel, dim3(1), dim3(kThreads), 0, ptr.data(),
                     static_cast<const int64_t*>(labels.data()), static_cast<const bool*>(mask), M, Nb);
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < M; ++i)
      if (mask[i] && labels[i] >= 0) rows.push_back(i);
    const int64_t n = static_cast<int64_t>(rows.size()), skip = n > Nb ? n - Nb : 0;
    for (int64_t r = skip; r < n; ++r) {
      const int64_t slot = (rptr[0] + r - skip) % Nb;
      std::memcpy(&rbank[slot * D], &feats[rows[r] * D], sizeof(T) * D);
      rlabels[slot] = labels[rows[r]];
    }
    rptr[0] = (rptr[0] + std::min(n, Nb)) % Nb;
    expect_equal("fifo rows", type, step, bank, rbank);
    expect_equal("fifo labels", type, step, bank_labels, rlabels);
    expect_equal("fifo ptr", type, step, ptr, rptr);
  }
  // segment sums over the stored labels: stable order by class, class offsets
  const int64_t C = 5;
  std::vector<int64_t> order(Nb), offsets(C + 1, 0);
  std::iota(order.begin(), order.end(), 0);
  auto key = [&](int64_t i) { return rlabels[i] < 0 ? C : rlabels[i]; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
  for (int64_t c = 0; c <= C; ++c)
    offsets[c] = std::count_if(rlabels.begin(), rlabels.end(), [&](int64_t l) { return l >= 0 && l < c; });
  std::vector<float> sums(C * D, -7.f), want(C * D, 0.f);
  cuda_emu::launch(icakd::segment_sum_kernel<T, float>, dim3(C, (D + kThreads - 1) / kThreads), dim3(kThreads), 0,
                   static_cast<const T*>(bank.data()), static_cast<const int64_t*>(order.data()),
                   static_cast<const int64_t*>(offsets.data()), sums.data(), D);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = offsets[c]; j < offsets[c + 1]; ++j)
      for (int64_t d = 0; d < D; ++d) want[c * D + d] += static_cast<float>(rbank[order[j] * D + d]);
  expect_equal("fifo segment sums", type, steps, sums, want);
}

int main() {
  // few classes and S = 4: several rows of a class per batch, more rows than slots, wrap-around;
  // D = 300 > 256 threads: two column passes per row
  class_bank<float>("float32", 4, 4, 300, 37, 4);
  class_bank<c10::BFloat16>("bfloat16", 4, 3, 70, 29, 3);
  fifo_bank<float>("float32", 24, 300, 19, 4);
  fifo_bank<c10::BFloat16>("bfloat16", 10, 70, 23, 3);  // more kept rows than slots
  std::printf("bank kernels: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
