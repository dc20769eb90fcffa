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
#include <cmath>
#include <vector>

#include "../checks.h"

namespace icakd {
namespace {

using at::Tensor;

void class_bank_enqueue_cpu(const Tensor& bank_, const Tensor& count_, const Tensor& ptr_, const Tensor& sums_,
                            const Tensor& feats_, const Tensor& labels_, const Tensor& mask_) {
  const ClassBankDims dims =
      check_class_bank_enqueue(bank_, count_, ptr_, sums_, feats_, labels_, mask_, c10::DeviceType::CPU);
  const int64_t C = dims.C, S = dims.S, D = dims.D, N = dims.N;
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

// sums[c] = the float32 sum of class c's stored rows, for the k classes cls[0..k) (in range)
void resync_classes(const Tensor& bank_, const Tensor& count_, const Tensor& sums_, const int64_t* cls, int64_t k) {
  const int64_t S = bank_.size(1), D = bank_.size(2);
  if (k == 0 || D == 0) return;
  const Tensor bank = bank_.contiguous();
  const Tensor count = count_.contiguous();
  WritableContig sums(sums_);
  const int64_t* cnt = count.const_data_ptr<int64_t>();
  float* sm = sums.work.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "icakd_class_bank_resync_cpu", [&] {
    const scalar_t* bk = bank.const_data_ptr<scalar_t>();
    auto run = [&](int64_t i0, int64_t i1) {
      // summed in a task-local row, then stored: a class listed twice is written twice with the
      // same values instead of being raced on
      std::vector<float> acc(D);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = cls[i];
        const int64_t filled = std::min<int64_t>(std::max<int64_t>(cnt[c], 0), S);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < filled; ++s) {
          const scalar_t* row = bk + (c * S + s) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(row[d]);
        }
        std::copy(acc.begin(), acc.end(), sm + c * D);
      }
    };
    if (k * S * D < 32768) {
      run(0, k);  // too little work to share out
    } else {
      at::parallel_for(0, k, 1, run);
    }
  });
  sums.commit();
}

void class_bank_resync_cpu(const Tensor& bank_, const Tensor& count_, const Tensor& sums_, const Tensor& classes_) {
  const auto checked = check_class_bank_resync(bank_, count_, sums_, classes_, c10::DeviceType::CPU);
  const int64_t k = std::get<1>(checked);
  check_index_range(classes_, 0, std::get<0>(checked).C, "classes");
  const Tensor classes = classes_.contiguous();
  resync_classes(bank_, count_, sums_, classes.const_data_ptr<int64_t>(), k);
}

void fifo_bank_enqueue_cpu(const Tensor& bank_, const Tensor& bank_labels_, const Tensor& ptr_, const Tensor& feats_,
                           const Tensor& labels_, const Tensor& mask_) {
  const FifoDims dims =
      check_fifo_bank_enqueue(bank_, bank_labels_, ptr_, feats_, labels_, mask_, c10::DeviceType::CPU);
  const int64_t Nb = dims.Nb, D = dims.D, M = dims.M;
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
  const FifoDims dims = check_fifo_bank_sums(bank_, bank_labels_, num_classes, c10::DeviceType::CPU);
  const int64_t Nb = dims.Nb, D = dims.D;
  // labels < 0 mark empty slots; a label >= num_classes is malformed
  check_index_below(bank_labels_, num_classes, "bank_labels");
  const Tensor bank = bank_.contiguous();
  const Tensor labels = bank_labels_.contiguous();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
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

// ---------------------------------------------------------------------------------------------
// update: refusal of non-finite rows + enqueue (+ resync for the class bank), one op per step
// ---------------------------------------------------------------------------------------------

// (rows in the storage dtype, mask without the rows holding a non-finite value); adds the rows
// that `mask` offered and were refused to `refused`
std::tuple<Tensor, Tensor> refuse_non_finite_cpu(const Tensor& feats_, const std::optional<Tensor>& mask_,
                                                 at::ScalarType storage, const Tensor& refused) {
  TORCH_CHECK(refused.scalar_type() == at::kLong && refused.numel() == 1,
              "refused must be a one-element int64 tensor, got ", refused.scalar_type(), " ", refused.sizes());
  check_float(feats_, "feats");
  check_dim(feats_, 2, "feats");
  const Tensor feats = feats_.to(storage).contiguous();
  const int64_t N = feats.size(0), D = feats.size(1);
  const bool has_mask = mask_.has_value() && mask_->defined();
  Tensor mask;
  if (has_mask) {
    check_dtype(*mask_, at::kBool, "mask");
    check_vector(*mask_, N, "mask", "N");
    mask = mask_->contiguous();
  }
  Tensor keep = at::empty({N}, feats.options().dtype(at::kBool));
  const bool* m = has_mask ? mask.const_data_ptr<bool>() : nullptr;
  bool* k = keep.data_ptr<bool>();
  int64_t n_refused = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, storage, "icakd_refuse_non_finite_cpu", [&] {
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      bool finite = true;
      const scalar_t* row = f + n * D;
      for (int64_t d = 0; d < D && finite; ++d) finite = std::isfinite(static_cast<float>(row[d]));
      const bool offered = m == nullptr || m[n];
      k[n] = offered && finite;
      n_refused += (offered && !finite) ? 1 : 0;
    }
  });
  if (n_refused) refused.add_(n_refused);
  return {feats, keep};
}

void class_bank_update_cpu(const Tensor& bank, const Tensor& count, const Tensor& ptr, const Tensor& sums,
                           const Tensor& resync_pos, const Tensor& refused, const Tensor& feats, const Tensor& labels,
                           const std::optional<Tensor>& mask, int64_t resync_chunk) {
  check_devices(c10::DeviceType::CPU, {{&bank, "bank"}, {&count, "count"}, {&ptr, "ptr"}, {&sums, "sums"},
                                       {&resync_pos, "resync_pos"}, {&refused, "refused"}, {&feats, "feats"},
                                       {&labels, "labels"}, {mask.has_value() ? &*mask : nullptr, "mask"}});
  check_float(bank, "bank");
  TORCH_CHECK(resync_chunk >= 0, "resync_chunk must be >= 0, got ", resync_chunk);
  TORCH_CHECK(resync_pos.scalar_type() == at::kLong && resync_pos.numel() == 1,
              "resync_pos must be a one-element int64 tensor, got ", resync_pos.scalar_type(), " ", resync_pos.sizes());
  const auto rows = refuse_non_finite_cpu(feats, mask, bank.scalar_type(), refused);
  class_bank_enqueue_cpu(bank, count, ptr, sums, std::get<0>(rows), labels, std::get<1>(rows));
  if (resync_chunk == 0) return;
  const int64_t C = bank.size(0);
  int64_t* rp = resync_pos.data_ptr<int64_t>();
  const int64_t pos = ((rp[0] % C) + C) % C;
  std::vector<int64_t> classes(resync_chunk);
  for (int64_t i = 0; i < resync_chunk; ++i) classes[i] = (pos + i) % C;
  resync_classes(bank, count, sums, classes.data(), resync_chunk);
  rp[0] = (pos + resync_chunk) % C;
}

void fifo_bank_update_cpu(const Tensor& bank, const Tensor& bank_labels, const Tensor& ptr, const Tensor& refused,
                          const Tensor& feats, const Tensor& labels, const std::optional<Tensor>& mask) {
  check_devices(c10::DeviceType::CPU, {{&bank, "bank"}, {&bank_labels, "bank_labels"}, {&ptr, "ptr"},
                                       {&refused, "refused"}, {&feats, "feats"}, {&labels, "labels"},
                                       {mask.has_value() ? &*mask : nullptr, "mask"}});
  check_float(bank, "bank");
  const auto rows = refuse_non_finite_cpu(feats, mask, bank.scalar_type(), refused);
  fifo_bank_enqueue_cpu(bank, bank_labels, ptr, std::get<0>(rows), labels, std::get<1>(rows));
}

void check_bank_lists(const char* first, size_t n, std::initializer_list<std::pair<const char*, size_t>> lists) {
  for (const auto& [name, size] : lists)
    TORCH_CHECK(size == n, name, " must hold one entry per bank (", n, ", as ", first, "), got ", size);
}

void class_banks_update_cpu(at::TensorList bank, at::TensorList count, at::TensorList ptr, at::TensorList sums,
                            at::TensorList resync_pos, at::TensorList refused, at::TensorList feats,
                            const Tensor& labels, const c10::List<std::optional<Tensor>>& mask,
                            int64_t resync_chunk) {
  const size_t n = bank.size();
  check_bank_lists("bank", n, {{"count", count.size()}, {"ptr", ptr.size()}, {"sums", sums.size()},
                               {"resync_pos", resync_pos.size()}, {"refused", refused.size()},
                               {"feats", feats.size()}, {"mask", mask.size()}});
  for (size_t i = 0; i < n; ++i)
    class_bank_update_cpu(bank[i], count[i], ptr[i], sums[i], resync_pos[i], refused[i], feats[i], labels, mask.get(i),
                          resync_chunk);
}

void fifo_banks_update_cpu(at::TensorList bank, at::TensorList bank_labels, at::TensorList ptr,
                           at::TensorList refused, at::TensorList feats, const Tensor& labels,
                           const c10::List<std::optional<Tensor>>& mask) {
  const size_t n = bank.size();
  check_bank_lists("bank", n, {{"bank_labels", bank_labels.size()}, {"ptr", ptr.size()},
                               {"refused", refused.size()}, {"feats", feats.size()}, {"mask", mask.size()}});
  for (size_t i = 0; i < n; ++i)
    fifo_bank_update_cpu(bank[i], bank_labels[i], ptr[i], refused[i], feats[i], labels, mask.get(i));
}

}  // namespace

TORCH_LIBRARY_IMPL(icakd_fast_C, CPU, m) {
  m.impl("class_bank_enqueue_", &class_bank_enqueue_cpu);
  m.impl("class_bank_resync_", &class_bank_resync_cpu);
  m.impl("fifo_bank_enqueue_", &fifo_bank_enqueue_cpu);
  m.impl("fifo_bank_sums", &fifo_bank_sums_cpu);
  m.impl("class_bank_update_", &class_bank_update_cpu);
  m.impl("fifo_bank_update_", &fifo_bank_update_cpu);
  m.impl("class_banks_update_", &class_banks_update_cpu);
  m.impl("fifo_banks_update_", &fifo_banks_update_cpu);
}

}  // namespace icakd
