// CPU kernels of the centroid, intra-class and inter-class ops.
//
// Inter loss: with n = mu / max(|mu|, eps) and v the valid mask, the masked relation difference
// is E = A B^T where A = [v n_s, v n_t] and B = [v n_s, -v n_t] ([C, Ds + Dt] each), so one GEMM
// per tile of rows gives a [T, C] block of E and one more (E_tile B) gives both dL/dn rows. Tiles
// of 64 rows are independent tasks (at::parallel_for; the GEMM inside a task is single-threaded),
// each task writes its own partial sum / its own rows, and partial sums are added in tile order,
// so results do not depend on the thread count. Extra memory: A, B, and one [64, C] tile per
// thread -- never a C x C matrix. When C is large against Ds + Dt, the Gram form of
// inter_gram.h (float64, O(C D^2)) replaces the tiles; it needs A only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../inter_gram.h"

namespace icakd {
namespace {

using at::Tensor;
constexpr int64_t kTile = 64;

// ---------------------------------------------------------------------------------------------
// centroids
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> centroids_fwd_cpu(const Tensor& sums_, const Tensor& counts_, const Tensor& feats_,
                                             const Tensor& labels_) {
  const CentroidDims dims = check_centroids(sums_, counts_, feats_, labels_, c10::DeviceType::CPU);
  const int64_t C = dims.C, D = dims.D, B = dims.B;
  const auto out_dt = dims.out_dt;
  check_index_range(labels_, 0, C, "labels");
  const Tensor sums = sums_.to(out_dt).contiguous();
  const Tensor counts = counts_.contiguous();
  const Tensor feats = feats_.contiguous();
  const Tensor labels = labels_.contiguous();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const ClassCSR csr = class_csr(lab, 1, nullptr, 0, B, C);
  Tensor mu = at::empty({C, D}, sums.options());
  Tensor total = at::empty({C}, counts.options());
  const int64_t* cnt = counts.const_data_ptr<int64_t>();
  int64_t* tot = total.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) tot[c] = cnt[c] + (csr.offsets[c + 1] - csr.offsets[c]);
  AT_DISPATCH_FLOATING_TYPES(out_dt, "icakd_centroids_fwd_cpu", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "icakd_centroids_fwd_cpu_f", [&] {
      const scalar_t* f = feats.const_data_ptr<scalar_t>();
      const out_t* s = sums.const_data_ptr<out_t>();
      out_t* m = mu.data_ptr<out_t>();
      at::parallel_for(0, C, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t c0, int64_t c1) {
        std::vector<out_t> acc(D);
        for (int64_t c = c0; c < c1; ++c) {
          std::fill(acc.begin(), acc.end(), out_t(0));
          for (int64_t j = csr.offsets[c]; j < csr.offsets[c + 1]; ++j) {
            const scalar_t* row = f + csr.rows[j] * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<out_t>(row[d]);
          }
          const out_t den = static_cast<out_t>(std::max<int64_t>(tot[c], 1));
          for (int64_t d = 0; d < D; ++d) m[c * D + d] = (s[c * D + d] + acc[d]) / den;
        }
      });
    });
  });
  return {mu, total};
}

// ---------------------------------------------------------------------------------------------
// intra
// ---------------------------------------------------------------------------------------------

// rows whose class is valid
int64_t intra_nvalid(const IntraArgs& a) {
  const int64_t* lab = a.labels.const_data_ptr<int64_t>();
  const bool* val = a.valid.const_data_ptr<bool>();
  int64_t nvalid = 0;
  for (int64_t b = 0; b < a.B; ++b) nvalid += val[lab[b]] ? 1 : 0;
  return nvalid;
}

// d_b = (f_s - mu_s[y]) - (f_t - mu_t[y]) per row (0 for invalid rows): |d_b|^2 into per_row
// (a fixed-order lane sum), dscale * d_b into dout -- one pass over each row, either or both.
template <typename acc_t>
void intra_rows(const IntraArgs& a, acc_t* per_row, acc_t* dout, acc_t dscale) {
  const acc_t* fs = a.f_s.const_data_ptr<acc_t>();
  const acc_t* ft = a.f_t.const_data_ptr<acc_t>();
  const acc_t* ms = a.mu_s.const_data_ptr<acc_t>();
  const acc_t* mt = a.mu_t.const_data_ptr<acc_t>();
  const int64_t* lab = a.labels.const_data_ptr<int64_t>();
  const bool* val = a.valid.const_data_ptr<bool>();
  const int64_t D = a.D;
  at::parallel_for(0, a.B, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = lab[b];
      const bool ok = val[c];
      const acc_t *xs = fs + b * D, *xt = ft + b * D, *cs = ms + c * D, *ct = mt + c * D;
      if (dout) {
        acc_t* o = dout + b * D;
        if (ok) {
          for (int64_t d = 0; d < D; ++d) o[d] = dscale * ((xs[d] - cs[d]) - (xt[d] - ct[d]));
        } else {
          std::fill(o, o + D, acc_t(0));
        }
      }
      if (per_row) {
        acc_t lanes[kLanes] = {};
        int64_t d = 0;
        for (; d + kLanes <= D; d += kLanes)
          for (int j = 0; j < kLanes; ++j) {
            const acc_t x = (xs[d + j] - cs[d + j]) - (xt[d + j] - ct[d + j]);
            lanes[j] += x * x;
          }
        for (int j = 0; d + j < D; ++j) {
          const acc_t x = (xs[d + j] - cs[d + j]) - (xt[d + j] - ct[d + j]);
          lanes[j] += x * x;
        }
        per_row[b] = ok ? lanes_tree_sum<acc_t>(lanes) : acc_t(0);
      }
    }
  });
}

Tensor intra_fwd_cpu(const Tensor& f_s, const Tensor& f_t, const Tensor& mu_s, const Tensor& mu_t, const Tensor& labels,
                     const Tensor& valid) {
  const IntraArgs a = intra_args(f_s, f_t, mu_s, mu_t, labels, valid, c10::DeviceType::CPU);
  Tensor out = at::empty({}, f_s.options().dtype(a.acc));
  AT_DISPATCH_FLOATING_TYPES(a.acc, "icakd_intra_fwd_cpu", [&] {
    std::vector<scalar_t> per_row(a.B);
    intra_rows<scalar_t>(a, per_row.data(), nullptr, scalar_t(0));
    scalar_t total = 0;
    for (int64_t b = 0; b < a.B; ++b) total += per_row[b];
    out.fill_(total / static_cast<scalar_t>(std::max<int64_t>(intra_nvalid(a), 1)));
  });
  return out;
}

Tensor intra_bwd_cpu(const Tensor& grad_out, const Tensor& f_s, const Tensor& f_t, const Tensor& mu_s,
                     const Tensor& mu_t, const Tensor& labels, const Tensor& valid) {
  check_grad_out(grad_out, f_s, "f_s", c10::DeviceType::CPU);
  const IntraArgs a = intra_args(f_s, f_t, mu_s, mu_t, labels, valid, c10::DeviceType::CPU);
  Tensor gd = at::empty({a.B, a.D}, f_s.options().dtype(a.acc));
  AT_DISPATCH_FLOATING_TYPES(a.acc, "icakd_intra_bwd_cpu", [&] {
    const scalar_t g = grad_out.to(at::kDouble).item<double>();
    const scalar_t scale = 2 * g / static_cast<scalar_t>(std::max<int64_t>(intra_nvalid(a), 1));
    intra_rows<scalar_t>(a, nullptr, gd.data_ptr<scalar_t>(), scale);
  });
  return gd;
}

// ---------------------------------------------------------------------------------------------
// inter
// ---------------------------------------------------------------------------------------------

Tensor inter_fwd_cpu(const Tensor& mu_s, const Tensor& mu_t, const Tensor& valid, double eps) {
  const InterDims d = check_inter(mu_s, mu_t, valid, eps, nullptr, c10::DeviceType::CPU);
  // the Gram form needs no operands: it builds A itself, chunk by chunk
  if (inter_use_gram(d.C, d.Ds + d.Dt, /*slow_fp64=*/false)) {
    return std::get<0>(gram_forward(mu_s, mu_t, valid, eps, d.acc));
  }
  const InterOperands op = inter_operands(mu_s, mu_t, valid, eps, d);
  const int64_t C = d.C;
  const double nvalid = static_cast<double>(valid.sum().item<int64_t>());
  const double den = std::max(nvalid * nvalid, 1.0);
  const int64_t ntiles = (C + kTile - 1) / kTile;
  // E is symmetric: tile i covers its diagonal block once and the blocks to its right twice.
  // Work item w pairs tile w with tile ntiles-1-w so that the tasks have equal cost.
  const int64_t nwork = (ntiles + 1) / 2;
  std::vector<double> partial(ntiles, 0.0);
  const Tensor Bt = op.B.t();
  auto run_tile = [&](int64_t tile) {
    const int64_t r0 = tile * kTile, r1 = std::min(C, r0 + kTile);
    const Tensor E = at::mm(op.A.narrow(0, r0, r1 - r0), Bt.narrow(1, r0, C - r0));  // [T, C - r0]
    AT_DISPATCH_FLOATING_TYPES(d.acc, "icakd_inter_fwd_tile", [&] {
      const scalar_t* e = E.const_data_ptr<scalar_t>();
      const int64_t T = r1 - r0, W = C - r0;
      double diag = 0.0, off = 0.0;
      for (int64_t i = 0; i < T; ++i) {
        const scalar_t* row = e + i * W;
        diag += static_cast<double>(sumsq_acc<scalar_t>(row, T));
        off += static_cast<double>(sumsq_acc<scalar_t>(row + T, W - T));
      }
      partial[tile] = diag + 2.0 * off;
    });
  };
  at::parallel_for(0, nwork, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      run_tile(w);
      if (ntiles - 1 - w != w) run_tile(ntiles - 1 - w);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return at::full({}, total / den, mu_s.options().dtype(d.acc));
}

// Rows whose dL/dn is computed: every valid row, or only valid & live rows when grad_mu_t is not
// needed (rows outside `live` get a zero grad_mu_s).
struct CpuRows {
  std::vector<int64_t> rows;
  Tensor index;  // the same as an int64 tensor
  Tensor live;   // contiguous `live`, or undefined
};

CpuRows cpu_rows(const Tensor& valid, const std::optional<Tensor>& live, bool need_t) {
  CpuRows r;
  const int64_t C = valid.size(0);
  const Tensor valid_c = valid.contiguous();
  const bool* vp = valid_c.const_data_ptr<bool>();
  const bool* lp = nullptr;
  if (live.has_value() && live->defined()) {
    r.live = live->contiguous();
    lp = r.live.const_data_ptr<bool>();
  }
  const bool live_only = lp != nullptr && !need_t;
  r.rows.reserve(C);
  for (int64_t c = 0; c < C; ++c)
    if (vp[c] && (!live_only || lp[c])) r.rows.push_back(c);
  const int64_t R = static_cast<int64_t>(r.rows.size());
  r.index = at::from_blob(r.rows.data(), {R}, at::TensorOptions().dtype(at::kLong)).clone();
  return r;
}

// 4 grad_out / |V|^2 on the host
double inter_scale(const Tensor& grad_out, const Tensor& valid) {
  const double nv = static_cast<double>(valid.sum().item<int64_t>());
  return 4.0 * grad_out.to(at::kDouble).item<double>() / std::max(nv * nv, 1.0);
}

// The Gram form's backward from K for the rows of `r` (all rows: slices instead of an index list)
std::tuple<Tensor, Tensor> gram_backward_cpu(const Tensor& grad_out, const Tensor& K, const Tensor& mu_s,
                                             const Tensor& mu_t, const Tensor& valid, const CpuRows& r, bool need_s,
                                             bool need_t, double eps, const at::TensorOptions& opts) {
  const bool all_rows = static_cast<int64_t>(r.rows.size()) == mu_s.size(0);
  return gram_backward(grad_out, K, mu_s, mu_t, valid, eps, all_rows ? Tensor() : r.index, r.live, need_s, need_t,
                       opts);
}

std::tuple<Tensor, Tensor> inter_gram_fwd_cpu(const Tensor& mu_s, const Tensor& mu_t, const Tensor& valid, double eps) {
  const InterDims d = check_inter(mu_s, mu_t, valid, eps, nullptr, c10::DeviceType::CPU);
  return gram_forward(mu_s, mu_t, valid, eps, d.acc);
}

std::tuple<Tensor, Tensor> inter_gram_bwd_cpu(const Tensor& grad_out, const Tensor& gram, const Tensor& mu_s,
                                              const Tensor& mu_t, const Tensor& valid,
                                              const std::optional<Tensor>& live, bool need_s, bool need_t,
                                              double eps, int64_t max_live) {
  const InterDims d =
      check_inter_gram_bwd(grad_out, gram, mu_s, mu_t, valid, live, eps, max_live, c10::DeviceType::CPU);
  const auto opts = mu_s.options().dtype(d.acc);
  if (!need_s && !need_t) return {at::empty({0}, opts), at::empty({0}, opts)};
  if (!need_t && max_live >= 0 && live.has_value() && live->defined()) {
    // the caller's bound: the device path's sync-free row choice (the host could count the rows,
    // but this keeps that path tested where CI runs)
    const Tensor live_c = live->contiguous();
    return gram_backward(grad_out, gram, mu_s, mu_t, valid, eps, bounded_live_rows(valid, live_c, max_live), live_c,
                         need_s, need_t, opts);
  }
  return gram_backward_cpu(grad_out, gram, mu_s, mu_t, valid, cpu_rows(valid, live, need_t), need_s, need_t, eps,
                           opts);
}

std::tuple<Tensor, Tensor> inter_bwd_cpu(const Tensor& grad_out, const Tensor& mu_s, const Tensor& mu_t,
                                         const Tensor& valid, const std::optional<Tensor>& live, bool need_s,
                                         bool need_t, double eps) {
  const bool has_live = live.has_value() && live->defined();
  const InterDims d = check_inter(mu_s, mu_t, valid, eps, has_live ? &*live : nullptr, c10::DeviceType::CPU);
  check_grad_out(grad_out, mu_s, "mu_s", c10::DeviceType::CPU);
  const int64_t C = d.C, Ds = d.Ds, Dt = d.Dt;
  const auto opts = mu_s.options().dtype(d.acc);
  if (!need_s && !need_t) return {at::empty({0}, opts), at::empty({0}, opts)};
  const CpuRows r = cpu_rows(valid, live, need_t);
  const std::vector<int64_t>& rows = r.rows;
  const Tensor& rows_t = r.index;
  const Tensor& live_c = r.live;
  const int64_t R = static_cast<int64_t>(rows.size());
  const int64_t ncol = (need_s ? Ds : 0) + (need_t ? Dt : 0);
  if (inter_bwd_use_gram(C, Ds + Dt, R, ncol)) {
    return gram_backward_cpu(grad_out, gram64(mu_s, mu_t, valid, eps), mu_s, mu_t, valid, r, need_s, need_t, eps,
                             opts);
  }
  const double scale = inter_scale(grad_out, valid);
  const InterOperands op = inter_operands(mu_s, mu_t, valid, eps, d);

  // columns of B needed by the second GEMM: [Ds] for n_s, [Dt] for n_t, or both. Each tile's
  // dL/dn rows go straight into the outputs (zero outside `rows`), which are then normalised in
  // place: no [C, Ds + Dt] buffer besides A and B.
  Tensor gs = need_s ? at::zeros({C, Ds}, opts) : at::empty({0}, opts);
  Tensor gt = need_t ? at::zeros({C, Dt}, opts) : at::empty({0}, opts);
  const Tensor Bt = op.B.t();
  const Tensor Bsel = op.B.narrow(1, need_s ? 0 : Ds, ncol);
  auto store = [&](const Tensor& Gt, int64_t i0, int64_t i1, bool contiguous_rows) {
    // Gt: [T, ncol] = [dL/dn_s | dL/dn_t] of rows[i0:i1]
    for (int part = 0; part < 2; ++part) {
      if ((part == 0 && !need_s) || (part == 1 && !need_t)) continue;
      Tensor& out = part == 0 ? gs : gt;
      const Tensor src = part == 0 ? Gt.narrow(1, 0, Ds) : Gt.narrow(1, ncol - Dt, Dt);
      if (contiguous_rows) {
        out.narrow(0, rows[i0], i1 - i0).copy_(src);
      } else {
        for (int64_t i = i0; i < i1; ++i) out[rows[i]].copy_(src[i - i0]);
      }
    }
  };
  at::parallel_for(0, (R + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kTile, i1 = std::min(R, i0 + kTile);
      const bool contiguous_rows = rows[i1 - 1] - rows[i0] == i1 - 1 - i0;
      const Tensor idx = rows_t.narrow(0, i0, i1 - i0);
      const Tensor At = contiguous_rows ? op.A.narrow(0, rows[i0], i1 - i0) : op.A.index_select(0, idx);
      const Tensor E = at::mm(At, Bt);    // [T, C]
      const Tensor Gt = at::mm(E, Bsel);  // [T, ncol]
      store(Gt, i0, i1, contiguous_rows);
    }
  });
  if (need_s) {
    gs.mul_(scale);
    normalize_backward_(gs, op.A.narrow(1, 0, Ds), op.norm_s, eps);
    if (has_live) gs.mul_(live_c.to(d.acc).unsqueeze(1));
  }
  if (need_t) {
    gt.mul_(scale);
    normalize_backward_(gt, op.A.narrow(1, Ds, Dt), op.norm_t, eps);
  }
  return {gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(icakd_fast_C, CPU, m) {
  m.impl("centroids_fwd", &centroids_fwd_cpu);
  m.impl("intra_fwd", &intra_fwd_cpu);
  m.impl("intra_bwd", &intra_bwd_cpu);
  m.impl("inter_fwd", &inter_fwd_cpu);
  m.impl("inter_bwd", &inter_bwd_cpu);
  m.impl("inter_gram_fwd", &inter_gram_fwd_cpu);
  m.impl("inter_gram_bwd", &inter_gram_bwd_cpu);
}

}  // namespace icakd
