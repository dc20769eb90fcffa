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
#include <type_traits>
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
    const scalar_t g = grad_out.item<double>();
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
  return 4.0 * grad_out.item<double>() / std::max(nv * nv, 1.0);
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

// ---------------------------------------------------------------------------------------------
// structure: both networks' centroids, the valid classes, intra and inter in one op
// ---------------------------------------------------------------------------------------------

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// (mu [C, D] in promote(sums, feats), total [C]): bank sums and counts plus the batch rows that
// `keep` (undefined: every row) marks, each class's rows summed in batch order before the bank
// sum is added (as class_centroids computes them)
// `names`: the arguments (sums, counts, feats, keep) of the network's side, for the messages
struct SideNames {
  const char *sums, *counts, *feats, *keep;
};

std::tuple<Tensor, Tensor> kept_centroids_cpu(const Tensor& sums_, const Tensor& counts_, const Tensor& feats_,
                                              const Tensor& labels, const std::optional<Tensor>& keep_,
                                              const SideNames& names) {
  check_float(sums_, names.sums);
  check_dim(sums_, 2, names.sums);
  const int64_t C = sums_.size(0), D = sums_.size(1), B = feats_.size(0);
  TORCH_CHECK(feats_.size(1) == D, names.feats, " must have the width of ", names.sums, " (", D, "), got shape ",
              feats_.sizes());
  check_dtype(counts_, at::kLong, names.counts);
  check_vector(counts_, C, names.counts, "C");
  const auto out_dt = at::promote_types(sums_.scalar_type(), feats_.scalar_type());
  const Tensor sums = sums_.to(out_dt).contiguous();
  const Tensor feats = feats_.to(out_dt).contiguous();
  const Tensor counts = counts_.contiguous();
  const int64_t* cnt = counts.const_data_ptr<int64_t>();
  Tensor keep;
  const bool* kp = nullptr;
  if (has(keep_)) {
    check_dtype(*keep_, at::kBool, names.keep);
    check_vector(*keep_, B, names.keep, "B");
    keep = keep_->contiguous();
    kp = keep.const_data_ptr<bool>();
  }
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  Tensor mu = at::zeros({C, D}, sums.options());
  Tensor total = at::empty({C}, counts_.options());
  int64_t* tot = total.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) tot[c] = cnt[c];
  AT_DISPATCH_FLOATING_TYPES(out_dt, "icakd_structure_centroids_cpu", [&] {
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    const scalar_t* sm = sums.const_data_ptr<scalar_t>();
    scalar_t* m = mu.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      if (kp != nullptr && !kp[b]) continue;
      const int64_t c = lab[b];
      tot[c] += 1;
      for (int64_t d = 0; d < D; ++d) m[c * D + d] += f[b * D + d];
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t den = static_cast<scalar_t>(std::max<int64_t>(tot[c], 1));
      for (int64_t d = 0; d < D; ++d) m[c * D + d] = (sm[c * D + d] + m[c * D + d]) / den;
    }
  });
  return {mu, total};
}

// x [B, Dx] @ projection^T ([D, Dx]) in float32 (float64 if either is float64)
Tensor project_rows(const Tensor& x, const Tensor& projection) {
  const auto acc = acc_type_of(x.scalar_type(), projection.scalar_type());
  return at::mm(x.to(acc), projection.to(acc).t());
}

// (x / max(|x|, eps) row by row in x's dtype, |x| [B] in the accumulation dtype): F.normalize
// (dim=1) of the batch rows, with the norms the backward needs
std::tuple<Tensor, Tensor> normalize_rows(const Tensor& x_, double eps) {
  const Tensor x = x_.contiguous();
  const int64_t B = x.size(0), D = x.size(1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor unit = at::empty({B, D}, x.options());
  Tensor norm = at::empty({B}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "icakd_normalize_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* up = unit.data_ptr<scalar_t>();
    acc_t* np = norm.data_ptr<acc_t>();
    std::vector<acc_t> row(D);
    for (int64_t b = 0; b < B; ++b) {
      np[b] = unit_row<acc_t>(xp + b * D, D, eps, row.data());
      for (int64_t d = 0; d < D; ++d) up[b * D + d] = static_cast<scalar_t>(row[d]);
    }
  });
  return {unit, norm};
}

// g [B, D] (dL/d unit rows) -> dL/dx in place, through unit = x / max(|x|, eps):
// (g - u (u . g)) / |x| where |x| > eps, g / eps elsewhere
void normalize_rows_backward(Tensor& g, const Tensor& unit_, const Tensor& norm_, double eps) {
  const Tensor unit = unit_.to(g.scalar_type()).contiguous();
  const Tensor norm = norm_.to(at::kDouble).contiguous();
  const int64_t B = g.size(0), D = g.size(1);
  const double* np = norm.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "icakd_normalize_rows_bwd", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* up = unit.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      scalar_t* gb = gp + b * D;
      const scalar_t* ub = up + b * D;
      if (np[b] > eps) {
        scalar_t ug = 0;
        for (int64_t d = 0; d < D; ++d) ug += ub[d] * gb[d];
        const scalar_t n = static_cast<scalar_t>(np[b]);
        for (int64_t d = 0; d < D; ++d) gb[d] = (gb[d] - ub[d] * ug) / n;
      } else {
        for (int64_t d = 0; d < D; ++d) gb[d] = gb[d] / static_cast<scalar_t>(eps);
      }
    }
  });
}

// Small problems (C (Ds + Dt)^2 up to kSmallStructure multiply-adds, centroids of one dtype) take
// plain loops (the fake kernel in icakd_fast/ops/_cpp_impl.py mirrors this rule) for the
// inter loss: its Gram form, K = A^T A with A = [v n_s, v n_t] in float64, as inter_gram.h defines
// it, and only the batch's classes' rows of the gradient. A step's structure term then costs
// microseconds instead of the dozens of tensor ops the BLAS-backed forms dispatch.
constexpr int64_t kSmallStructure = int64_t(1) << 18;

bool small_structure(int64_t C, int64_t width) { return C * width * width <= kSmallStructure; }

// K [W, W] float64 (W = Ds + Dt) of the valid rows
template <typename mu_t>
void small_gram(const mu_t* ms, const mu_t* mt, const bool* valid, int64_t C, int64_t Ds, int64_t Dt, double eps,
                double* K) {
  const int64_t W = Ds + Dt;
  std::fill(K, K + W * W, 0.0);
  std::vector<double> a(W);
  for (int64_t c = 0; c < C; ++c) {
    if (!valid[c]) continue;
    unit_row<double>(ms + c * Ds, Ds, eps, a.data());
    unit_row<double>(mt + c * Dt, Dt, eps, a.data() + Ds);
    for (int64_t i = 0; i < W; ++i) {
      const double ai = a[i];
      double* Ki = K + i * W;
      for (int64_t j = 0; j < W; ++j) Ki[j] += ai * a[j];
    }
  }
}

double gram_sum_sq_host(const double* K, int64_t Ds, int64_t W) {
  double total = 0.0;
  for (int64_t i = 0; i < W; ++i)
    for (int64_t j = 0; j < W; ++j) {
      const double k2 = K[i * W + j] * K[i * W + j];
      total += ((i < Ds) == (j < Ds)) ? k2 : -k2;
    }
  return total;
}

using StructureOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

StructureOut structure_terms(const Tensor& sums_s, const Tensor& count_s, const Tensor& sums_t, const Tensor& count_t,
                             const Tensor& f_s, const Tensor& f_t, const Tensor& labels_,
                             const std::optional<Tensor>& keep_s, const std::optional<Tensor>& keep_t,
                             int64_t min_count, double eps);

StructureOut structure_fwd_cpu(const Tensor& sums_s, const Tensor& count_s, const Tensor& sums_t,
                               const Tensor& count_t, const Tensor& x_s, const Tensor& x_t, const Tensor& labels,
                               const std::optional<Tensor>& keep_s, const std::optional<Tensor>& keep_t,
                               int64_t min_count, double eps, bool normalize,
                               const std::optional<Tensor>& projection) {
  check_devices(c10::DeviceType::CPU, {{&sums_s, "sums_s"}, {&count_s, "count_s"}, {&sums_t, "sums_t"},
                                       {&count_t, "count_t"}, {&x_s, "f_s"}, {&x_t, "f_t"}, {&labels, "labels"},
                                       {keep_s.has_value() ? &*keep_s : nullptr, "keep_s"},
                                       {keep_t.has_value() ? &*keep_t : nullptr, "keep_t"},
                                       {projection.has_value() ? &*projection : nullptr, "projection"}});
  check_float(x_s, "f_s");
  check_float(x_t, "f_t");
  check_dim(x_s, 2, "f_s");
  Tensor u_s = x_s;
  if (has(projection)) {
    TORCH_CHECK(normalize, "projection needs normalize=True");
    check_float(*projection, "projection");
    check_dim(*projection, 2, "projection");
    TORCH_CHECK(projection->size(1) == x_s.size(1), "projection must be [D, ", x_s.size(1),
                "] (the width of f_s), got shape ", projection->sizes());
    u_s = project_rows(x_s, *projection);
  }
  TORCH_CHECK(x_t.sizes() == u_s.sizes(), "f_t must have the shape of f_s", has(projection) ? " projected " : " ",
              u_s.sizes(), ", got ", x_t.sizes());
  if (!normalize) return structure_terms(sums_s, count_s, sums_t, count_t, x_s, x_t, labels, keep_s, keep_t,
                                         min_count, eps);
  auto [unit_s, norm_s] = normalize_rows(u_s, eps);
  Tensor unit_t = std::get<0>(normalize_rows(x_t, eps));
  StructureOut out =
      structure_terms(sums_s, count_s, sums_t, count_t, unit_s, unit_t, labels, keep_s, keep_t, min_count, eps);
  std::get<7>(out) = unit_s;
  std::get<8>(out) = unit_t;
  std::get<9>(out) = norm_s;
  return out;
}

// the structure term of unit rows f_s, f_t; the last three outputs are empty
StructureOut structure_terms(const Tensor& sums_s, const Tensor& count_s, const Tensor& sums_t, const Tensor& count_t,
                             const Tensor& f_s, const Tensor& f_t, const Tensor& labels_,
                             const std::optional<Tensor>& keep_s, const std::optional<Tensor>& keep_t,
                             int64_t min_count, double eps) {
  check_dtype(labels_, at::kLong, "labels");
  check_vector(labels_, f_s.size(0), "labels", "B");
  TORCH_CHECK(sums_t.sizes() == sums_s.sizes(), "sums_t must have the shape of sums_s ", sums_s.sizes(), ", got ",
              sums_t.sizes());
  const Tensor labels = labels_.contiguous();
  check_index_range(labels, 0, sums_s.size(0), "labels");
  auto st = kept_centroids_cpu(sums_s, count_s, f_s, labels, keep_s, {"sums_s", "count_s", "f_s", "keep_s"});
  auto tt = kept_centroids_cpu(sums_t, count_t, f_t, labels, keep_t, {"sums_t", "count_t", "f_t", "keep_t"});
  const Tensor& mu_s = std::get<0>(st);
  const Tensor& mu_t = std::get<0>(tt);
  const int64_t C = mu_s.size(0), Ds = mu_s.size(1), Dt = mu_t.size(1), W = Ds + Dt;
  Tensor valid = at::empty({C}, labels.options().dtype(at::kBool));
  {
    const int64_t* ts = std::get<1>(st).const_data_ptr<int64_t>();
    const int64_t* tt_ = std::get<1>(tt).const_data_ptr<int64_t>();
    bool* vp = valid.data_ptr<bool>();
    for (int64_t c = 0; c < C; ++c) vp[c] = ts[c] >= min_count && tt_[c] >= min_count;
  }
  if (small_structure(C, W) && mu_s.scalar_type() == mu_t.scalar_type()) {
    // everything in loops: intra (as intra_fwd_cpu, in the dtype of the centroids) and the Gram
    // form of inter
    const bool* vp = valid.const_data_ptr<bool>();
    int64_t nv = 0;
    for (int64_t c = 0; c < C; ++c) nv += vp[c] ? 1 : 0;
    Tensor gram = at::empty({W, W}, mu_s.options().dtype(at::kDouble));
    double* K = gram.data_ptr<double>();
    const auto acc = mu_s.scalar_type();
    Tensor intra = at::empty({}, mu_s.options());
    Tensor inter = at::empty({}, mu_s.options());
    const Tensor fs_c = f_s.to(acc).contiguous(), ft_c = f_t.to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "icakd_structure_small", [&] {
      const scalar_t* ms = mu_s.const_data_ptr<scalar_t>();
      const scalar_t* mt = mu_t.const_data_ptr<scalar_t>();
      const scalar_t* xs = fs_c.const_data_ptr<scalar_t>();
      const scalar_t* xt = ft_c.const_data_ptr<scalar_t>();
      const int64_t* lab = labels.const_data_ptr<int64_t>();
      const int64_t B = labels.size(0);
      scalar_t total = 0;
      int64_t rows = 0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t c = lab[b];
        if (!vp[c]) continue;
        ++rows;
        scalar_t row = 0;
        for (int64_t d = 0; d < Ds; ++d) {
          const scalar_t x = (xs[b * Ds + d] - ms[c * Ds + d]) - (xt[b * Ds + d] - mt[c * Ds + d]);
          row += x * x;
        }
        total += row;
      }
      intra.fill_(total / static_cast<scalar_t>(std::max<int64_t>(rows, 1)));
      small_gram<scalar_t>(ms, mt, vp, C, Ds, Dt, eps, K);
      const double den = std::max(static_cast<double>(nv) * static_cast<double>(nv), 1.0);
      inter.fill_(static_cast<scalar_t>(gram_sum_sq_host(K, Ds, W) / den));
    });
    auto none = [&] { return at::empty({0}, mu_s.options()); };
    return {intra, inter, mu_s, mu_t, valid, std::get<1>(st), gram, none(), none(), none()};
  }
  const Tensor intra = intra_fwd_cpu(f_s, f_t, mu_s, mu_t, labels, valid);
  const InterDims d = check_inter(mu_s, mu_t, valid, eps, nullptr, c10::DeviceType::CPU);
  Tensor inter, gram;
  if (inter_use_gram(d.C, d.Ds + d.Dt, /*slow_fp64=*/false)) {
    std::tie(inter, gram) = gram_forward(mu_s, mu_t, valid, eps, d.acc);
  } else {
    inter = inter_fwd_cpu(mu_s, mu_t, valid, eps);
    gram = at::empty({0}, mu_s.options().dtype(at::kDouble));
  }
  auto none = [&] { return at::empty({0}, mu_s.options()); };
  return {intra, inter, mu_s, mu_t, valid, std::get<1>(st), gram, none(), none(), none()};
}

// dL/dmu_s [C, Ds] (float64, row-major) of the inter loss from K, for the classes in `labels`
// (other rows 0):
// with A S = [n_s, -n_t], dL/dn_s[c] = 4 g / |V|^2 ((A S)[c] K)[:Ds], then through the
// normalisation (as F.normalize: (g - n (n . g)) / |mu| where |mu| > eps, g / eps elsewhere)
std::vector<double> small_inter_grad(const Tensor& grad_inter, const Tensor& gram, const Tensor& mu_s,
                                     const Tensor& mu_t, const Tensor& valid_, const Tensor& labels, double eps) {
  const int64_t C = mu_s.size(0), Ds = mu_s.size(1), Dt = mu_t.size(1), W = Ds + Dt, B = labels.size(0);
  check_float(grad_inter, "grad_inter");
  check_one_element(grad_inter, "grad_inter");
  const Tensor valid = valid_.contiguous();
  const bool* vp = valid.const_data_ptr<bool>();
  int64_t nv = 0;
  for (int64_t c = 0; c < C; ++c) nv += vp[c] ? 1 : 0;
  const double scale = 4.0 * grad_inter.item<double>() / std::max(static_cast<double>(nv) * nv, 1.0);
  const Tensor K_ = gram.contiguous();
  const double* K = K_.const_data_ptr<double>();
  const Tensor ms_c = mu_s.contiguous(), mt_c = mu_t.contiguous();
  std::vector<double> out(C * Ds, 0.0);
  double* o = out.data();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  std::vector<char> done(C, 0);
  std::vector<double> a(W), g(Ds);
  AT_DISPATCH_FLOATING_TYPES(mu_s.scalar_type(), "icakd_structure_small_inter_grad", [&] {
    const scalar_t* ms = ms_c.const_data_ptr<scalar_t>();
    const scalar_t* mt = mt_c.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t c = lab[b];
      if (done[c] || !vp[c]) continue;
      done[c] = 1;
      const double norm = unit_row<double>(ms + c * Ds, Ds, eps, a.data());
      unit_row<double>(mt + c * Dt, Dt, eps, a.data() + Ds);
      for (int64_t j = 0; j < Ds; ++j) {
        double acc = 0.0;
        for (int64_t i = 0; i < W; ++i) acc += (i < Ds ? a[i] : -a[i]) * K[i * W + j];
        g[j] = scale * acc;
      }
      double* oc = o + c * Ds;
      if (norm > eps) {
        double ng = 0.0;
        for (int64_t j = 0; j < Ds; ++j) ng += a[j] * g[j];
        for (int64_t j = 0; j < Ds; ++j) oc[j] = (g[j] - a[j] * ng) / norm;
      } else {
        for (int64_t j = 0; j < Ds; ++j) oc[j] = g[j] / eps;
      }
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> structure_bwd_cpu(const Tensor& grad_intra, const Tensor& grad_inter, const Tensor& f_s,
                                             const Tensor& f_t, const Tensor& mu_s, const Tensor& mu_t,
                                             const Tensor& valid, const Tensor& total_s, const Tensor& labels_,
                                             const std::optional<Tensor>& keep_s, const Tensor& gram, double eps,
                                             const std::optional<Tensor>& norm_s, const std::optional<Tensor>& x_s,
                                             const std::optional<Tensor>& projection) {
  check_devices(c10::DeviceType::CPU, {{&grad_intra, "grad_intra"}, {&grad_inter, "grad_inter"}, {&f_s, "f_s"},
                                       {&f_t, "f_t"}, {&mu_s, "mu_s"}, {&mu_t, "mu_t"}, {&valid, "valid"},
                                       {&total_s, "total_s"}, {&labels_, "labels"},
                                       {keep_s.has_value() ? &*keep_s : nullptr, "keep_s"}, {&gram, "gram"},
                                       {norm_s.has_value() ? &*norm_s : nullptr, "norm_s"},
                                       {x_s.has_value() ? &*x_s : nullptr, "x_s"},
                                       {projection.has_value() ? &*projection : nullptr, "projection"}});
  TORCH_CHECK(has(x_s) == has(projection), "x_s and projection must be given together");
  TORCH_CHECK(!has(projection) || has(norm_s), "projection needs norm_s (structure_fwd's, after normalize)");
  check_float(grad_intra, "grad_intra");
  check_one_element(grad_intra, "grad_intra");
  check_float(grad_inter, "grad_inter");
  check_one_element(grad_inter, "grad_inter");
  check_dtype(labels_, at::kLong, "labels");
  check_dtype(gram, at::kDouble, "gram");
  TORCH_CHECK(mu_s.dim() == 2 && mu_t.dim() == 2 && mu_t.size(0) == mu_s.size(0),
              "mu_s and mu_t must be [C, D] of one C, got ", mu_s.sizes(), " and ", mu_t.sizes());
  const Tensor labels = labels_.contiguous();
  const int64_t B = labels.size(0), C = mu_s.size(0), D = mu_s.size(1);
  check_dtype(total_s, at::kLong, "total_s");
  check_vector(total_s, C, "total_s", "C");
  Tensor out = intra_bwd_cpu(grad_intra, f_s, f_t, mu_s, mu_t, labels, valid);  // [B, D], dL/df_s of intra
  const int64_t Dt = mu_t.size(1), W = D + Dt;
  Tensor gm;  // dL/dmu_s [C, D] in out's dtype
  std::vector<double> small;
  if (small_structure(C, W) && gram.numel() == W * W && mu_s.scalar_type() == mu_t.scalar_type()) {
    small = small_inter_grad(grad_inter, gram, mu_s, mu_t, valid, labels, eps);
  } else {
    const Tensor live = at::zeros({C}, valid.options()).index_fill_(0, labels, true);
    const Tensor g_mu =
        gram.numel() > 0
            ? std::get<0>(inter_gram_bwd_cpu(grad_inter, gram, mu_s, mu_t, valid, live, true, false, eps, B))
            : std::get<0>(inter_bwd_cpu(grad_inter, mu_s, mu_t, valid, live, true, false, eps));
    gm = g_mu.to(out.scalar_type()).contiguous();
  }
  // each kept row's share of its class's centroid gradient: g_mu[y] / total_s[y]
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const Tensor tot_c = total_s.contiguous();
  const int64_t* tot = tot_c.const_data_ptr<int64_t>();
  Tensor keep;
  const bool* kp = nullptr;
  if (has(keep_s)) {
    keep = keep_s->contiguous();
    kp = keep.const_data_ptr<bool>();
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "icakd_structure_bwd_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* g = gm.defined() ? gm.const_data_ptr<scalar_t>() : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      if (kp != nullptr && !kp[b]) continue;
      const int64_t c = lab[b];
      const scalar_t den = static_cast<scalar_t>(std::max<int64_t>(tot[c], 1));
      if (g != nullptr) {
        for (int64_t d = 0; d < D; ++d) o[b * D + d] += g[c * D + d] / den;
      } else {
        for (int64_t d = 0; d < D; ++d) o[b * D + d] += static_cast<scalar_t>(small[c * D + d]) / den;
      }
    }
  });
  if (has(norm_s)) {
    check_float(*norm_s, "norm_s");
    check_vector(*norm_s, B, "norm_s", "B");
    normalize_rows_backward(out, f_s, *norm_s, eps);
  }
  if (!has(projection)) return {out.to(f_s.scalar_type()), at::empty({0}, out.options())};
  // u = x P^T: dL/dx = g P, dL/dP = g^T x (in the accumulation dtype of the forward's product)
  check_float(*x_s, "x_s");
  check_dim(*x_s, 2, "x_s");
  check_float(*projection, "projection");
  TORCH_CHECK(projection->dim() == 2 && projection->size(0) == D && projection->size(1) == x_s->size(1) &&
                  x_s->size(0) == B,
              "projection must be [", D, ", Dx] and x_s [", B, ", Dx], got ", projection->sizes(), " and ",
              x_s->sizes());
  const auto acc = acc_type_of(x_s->scalar_type(), projection->scalar_type());
  const Tensor g = out.to(acc);
  return {at::mm(g, projection->to(acc)).to(x_s->scalar_type()),
          at::mm(g.t(), x_s->to(acc)).to(projection->scalar_type())};
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
  m.impl("structure_fwd", &structure_fwd_cpu);
  m.impl("structure_bwd", &structure_bwd_cpu);
}

}  // namespace icakd
