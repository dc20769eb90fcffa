// CPU kernels of the memory-bank ops.
//
// Enqueue groups the batch by class with a stable counting sort (host side, O(N + C)), then one
// task per class writes that class's rows in batch order and adds their deltas to its float32
// running sum in the same order: the result does not depend on the thread count and is
// bit-identical for the same inputs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace icakd {
namespace {

using at::Tensor;

void check_class_bank(const Tensor& bank, const Tensor& count, const Tensor& ptr, const Tensor& sums) {
  check_float(bank, "bank");
  check_dim(bank, 3, "bank");
  const int64_t C = bank.size(0), D = bank.size(2);
  TORCH_CHECK(bank.size(1) > 0, "bank must have at least one slot per class");
  check_dtype(count, at::kLong, "count");
  check_dtype(ptr, at::kLong, "ptr");
  check_dtype(sums, at::kFloat, "sums");
  TORCH_CHECK(count.dim() == 1 && count.size(0) == C, "count must be [C] = [", C, "], got ", count.sizes());
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) == C, "ptr must be [C] = [", C, "], got ", ptr.sizes());
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == C && sums.size(1) == D, "sums must be [C, D] = [", C, ", ", D,
              "], got ", sums.sizes());
  for (const Tensor* t : {&count, &ptr, &sums}) {
    check_same_device(bank, *t, "bank state");
  }
}

void check_batch(const Tensor& feats, const Tensor& labels, const Tensor& mask, int64_t D, const Tensor& ref) {
  check_float(feats, "feats");
  check_dim(feats, 2, "feats");
  TORCH_CHECK(feats.size(1) == D, "feats must be [N, ", D, "], got ", feats.sizes());
  check_dtype(labels, at::kLong, "labels");
  check_dtype(mask, at::kBool, "mask");
  const int64_t N = feats.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == N, "labels must be [N] = [", N, "], got ", labels.sizes());
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == N, "mask must be [N] = [", N, "], got ", mask.sizes());
  check_same_device(ref, feats, "feats");
  check_same_device(ref, labels, "labels");
  check_same_device(ref, mask, "mask");
}

// Buffers given to a mutating op may be views; work on contiguous copies and write back.
struct WritableContig {
  Tensor target, work;
  explicit WritableContig(const Tensor& t) : target(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void commit() {
    if (!work.is_same(target)) target.copy_(work);
  }
};

void class_bank_enqueue_cpu(const Tensor& bank_, const Tensor& count_, const Tensor& ptr_, const Tensor& sums_,
                            const Tensor& feats_, const Tensor& labels_, const Tensor& mask_) {
  check_class_bank(bank_, count_, ptr_, sums_);
  const int64_t C = bank_.size(0), S = bank_.size(1), D = bank_.size(2);
  check_batch(feats_, labels_, mask_, D, bank_);
  const int64_t N = feats_.size(0);
  if (N == 0) return;
  WritableContig bank(bank_), count(count_), ptr(ptr_), sums(sums_);
  const Tensor labels = labels_.contiguous();
  const Tensor mask = mask_.contiguous();
  // rows converted to the bank dtype first, as the reference does (values stored == values summed)
  const Tensor feats = feats_.to(bank_.scalar_type()).contiguous();
  const ClassCSR csr = class_csr(labels.const_data_ptr<int64_t>(), 1, mask.const_data_ptr<bool>(), 1, N, C);
  std::vector<int64_t> present;
  for (int64_t c = 0; c < C; ++c)
    if (csr.offsets[c + 1] > csr.offsets[c]) present.push_back(c);
  const int64_t P = static_cast<int64_t>(present.size());
  int64_t* cnt = count.work.data_ptr<int64_t>();
  int64_t* ptr_p = ptr.work.data_ptr<int64_t>();
  float* sm = sums.work.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank_.scalar_type(), "icakd_class_bank_enqueue_cpu", [&] {
    scalar_t* bk = bank.work.data_ptr<scalar_t>();
    const scalar_t* src = feats.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
    at::parallel_for(0, P, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = present[i];
        const int64_t beg = csr.offsets[c], n = csr.offsets[c + 1] - beg;
        const int64_t skip = std::max<int64_t>(n - S, 0);
        const int64_t p0 = ((ptr_p[c] % S) + S) % S, filled = cnt[c];
        float* sc = sm + c * D;
        for (int64_t r = skip; r < n; ++r) {
          const int64_t row = csr.rows[beg + r];
          const int64_t slot = (p0 + r - skip) % S;
          scalar_t* dst = bk + (c * S + slot) * D;
          const scalar_t* s = src + row * D;
          if (slot < filled) {
            for (int64_t d = 0; d < D; ++d) {
              const float delta = static_cast<float>(s[d]) - static_cast<float>(dst[d]);
              sc[d] += delta;
              dst[d] = s[d];
            }
          } else {
            for (int64_t d = 0; d < D; ++d) {
              sc[d] += static_cast<float>(s[d]);
              dst[d] = s[d];
            }
          }
        }
        const int64_t taken = std::min(n, S);
        ptr_p[c] = (p0 + taken) % S;
        cnt[c] = std::min(filled + n, S);
      }
    });
  });
  bank.commit();
  count.commit();
  ptr.commit();
  sums.commit();
}

void class_bank_resync_cpu(const Tensor& bank_, const Tensor& count_, const Tensor& sums_, const Tensor& classes_) {
  check_float(bank_, "bank");
  check_dim(bank_, 3, "bank");
  const int64_t C = bank_.size(0), S = bank_.size(1), D = bank_.size(2);
  check_dtype(count_, at::kLong, "count");
  check_dtype(sums_, at::kFloat, "sums");
  check_dtype(classes_, at::kLong, "classes");
  TORCH_CHECK(count_.dim() == 1 && count_.size(0) == C, "count must be [C], got ", count_.sizes());
  TORCH_CHECK(sums_.dim() == 2 && sums_.size(0) == C && sums_.size(1) == D, "sums must be [C, D], got ", sums_.sizes());
  TORCH_CHECK(classes_.dim() == 1, "classes must be 1-D, got ", classes_.sizes());
  const Tensor bank = bank_.contiguous();
  const Tensor count = count_.contiguous();
  const Tensor classes = classes_.contiguous();
  WritableContig sums(sums_);
  const int64_t k = classes.size(0);
  const int64_t* cls = classes.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < k; ++i) TORCH_CHECK(cls[i] >= 0 && cls[i] < C, "classes out of range: ", cls[i]);
  const int64_t* cnt = count.const_data_ptr<int64_t>();
  float* sm = sums.work.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "icakd_class_bank_resync_cpu", [&] {
    const scalar_t* bk = bank.const_data_ptr<scalar_t>();
    at::parallel_for(0, k, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = cls[i];
        const int64_t filled = std::min<int64_t>(std::max<int64_t>(cnt[c], 0), S);
        float* sc = sm + c * D;
        for (int64_t d = 0; d < D; ++d) sc[d] = 0.f;
        for (int64_t s = 0; s < filled; ++s) {
          const scalar_t* row = bk + (c * S + s) * D;
          for (int64_t d = 0; d < D; ++d) sc[d] += static_cast<float>(row[d]);
        }
      }
    });
  });
  sums.commit();
}

void fifo_bank_enqueue_cpu(const Tensor& bank_, const Tensor& bank_labels_, const Tensor& ptr_, const Tensor& feats_,
                           const Tensor& labels_, const Tensor& mask_) {
  check_float(bank_, "bank");
  check_dim(bank_, 2, "bank");
  const int64_t Nb = bank_.size(0), D = bank_.size(1);
  TORCH_CHECK(Nb > 0, "bank must have at least one row");
  check_dtype(bank_labels_, at::kLong, "bank_labels");
  check_dtype(ptr_, at::kLong, "ptr");
  TORCH_CHECK(bank_labels_.dim() == 1 && bank_labels_.size(0) == Nb, "bank_labels must be [N], got ",
              bank_labels_.sizes());
  TORCH_CHECK(ptr_.numel() == 1, "ptr must hold one element, got ", ptr_.sizes());
  check_batch(feats_, labels_, mask_, D, bank_);
  const int64_t M = feats_.size(0);
  if (M == 0) return;
  WritableContig bank(bank_), bank_labels(bank_labels_), ptr(ptr_);
  const Tensor feats = feats_.to(bank_.scalar_type()).contiguous();
  const Tensor labels = labels_.contiguous();
  const Tensor mask = mask_.contiguous();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const bool* msk = mask.const_data_ptr<bool>();
  std::vector<int64_t> kept;
  kept.reserve(M);
  for (int64_t i = 0; i < M; ++i)
    if (msk[i] && lab[i] >= 0) kept.push_back(i);
  const int64_t n = static_cast<int64_t>(kept.size());
  const int64_t skip = std::max<int64_t>(n - Nb, 0);
  int64_t* pp = ptr.work.data_ptr<int64_t>();
  const int64_t p0 = ((pp[0] % Nb) + Nb) % Nb;
  int64_t* bl = bank_labels.work.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank_.scalar_type(), "icakd_fifo_bank_enqueue_cpu", [&] {
    scalar_t* bk = bank.work.data_ptr<scalar_t>();
    const scalar_t* src = feats.const_data_ptr<scalar_t>();
    at::parallel_for(skip, n, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = kept[i];
        const int64_t slot = (p0 + i - skip) % Nb;
        std::copy(src + row * D, src + (row + 1) * D, bk + slot * D);
        bl[slot] = lab[row];
      }
    });
  });
  pp[0] = (p0 + std::min(n, Nb)) % Nb;
  bank.commit();
  bank_labels.commit();
  ptr.commit();
}

std::tuple<Tensor, Tensor> fifo_bank_sums_cpu(const Tensor& bank_, const Tensor& bank_labels_, int64_t num_classes) {
  check_float(bank_, "bank");
  check_dim(bank_, 2, "bank");
  check_dtype(bank_labels_, at::kLong, "bank_labels");
  TORCH_CHECK(num_classes >= 0, "num_classes must be >= 0");
  const int64_t Nb = bank_.size(0), D = bank_.size(1);
  TORCH_CHECK(bank_labels_.dim() == 1 && bank_labels_.size(0) == Nb, "bank_labels must be [N], got ",
              bank_labels_.sizes());
  const Tensor bank = bank_.contiguous();
  const Tensor labels = bank_labels_.contiguous();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < Nb; ++i)
    TORCH_CHECK(lab[i] < num_classes, "bank_labels out of range: ", lab[i], " >= num_classes=", num_classes);
  const ClassCSR csr = class_csr(lab, 1, nullptr, 0, Nb, num_classes);
  Tensor sums = at::zeros({num_classes, D}, bank.options().dtype(at::kFloat));
  Tensor counts = at::empty({num_classes}, labels.options());
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t c = 0; c < num_classes; ++c) cp[c] = csr.offsets[c + 1] - csr.offsets[c];
  float* sm = sums.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "icakd_fifo_bank_sums_cpu", [&] {
    const scalar_t* bk = bank.const_data_ptr<scalar_t>();
    at::parallel_for(0, num_classes, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float* sc = sm + c * D;
        for (int64_t j = csr.offsets[c]; j < csr.offsets[c + 1]; ++j) {
          const scalar_t* row = bk + csr.rows[j] * D;
          for (int64_t d = 0; d < D; ++d) sc[d] += static_cast<float>(row[d]);
        }
      }
    });
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(icakd_fast_C, CPU, m) {
  m.impl("class_bank_enqueue_", &class_bank_enqueue_cpu);
  m.impl("class_bank_resync_", &class_bank_resync_cpu);
  m.impl("fifo_bank_enqueue_", &fifo_bank_enqueue_cpu);
  m.impl("fifo_bank_sums", &fifo_bank_sums_cpu);
}

}  // namespace icakd
