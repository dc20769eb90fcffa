"""ICAKDLoss: variants, gradient flow, bank updates, torch.compile, autocast, hooks."""

import pytest
import torch
from torch import nn

from icakd_fast import FeatureTap, ICAKDLoss

C, DS, DT, B = 6, 8, 12, 10


def batch(dtype=torch.float32, teacher_grad=False, hw_s=4, hw_t=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(B, DS, hw_s, hw_s, generator=g).relu().to(dtype).requires_grad_()
    zs = torch.randn(B, C, generator=g).to(dtype).requires_grad_()
    ft = torch.randn(B, DT, hw_t, hw_t, generator=g).relu().to(dtype).requires_grad_(teacher_grad)
    zt = torch.randn(B, C, generator=g).to(dtype).requires_grad_(teacher_grad)
    y = torch.randint(0, C, (B,), generator=g)
    ws = torch.randn(C, DS, generator=g).to(dtype).requires_grad_()
    wt = torch.randn(C, DT, generator=g).to(dtype).requires_grad_(teacher_grad)
    return fs, zs, ft, zt, y, ws, wt


@pytest.mark.parametrize("method,parts", [
    ("ce", {"ce"}),
    ("kd", {"ce", "kd"}),
    ("cskd", {"ce", "kd", "intra", "inter"}),
    ("icakd", {"ce", "kd", "cam", "intra", "inter"}),
])
def test_variants_report_their_terms_and_sum_to_the_loss(method, parts):
    mod = ICAKDLoss(C, DS, DT, method=method, w_kd=0.5, w_intra=2.0, w_inter=3.0)
    out = mod(*batch())
    assert set(out.parts) == parts
    w = {"ce": 1.0, "kd": 0.5, "cam": 1000.0 / 16, "intra": 2.0, "inter": 3.0}
    total = sum(w[k] * v for k, v in out.parts.items())
    torch.testing.assert_close(out.loss.detach(), total)
    assert all(not v.requires_grad for v in out.parts.values())
    if method == "cskd":
        assert mod.bank_s is None  # batch-only centroids
    if method == "icakd":
        assert mod.bank_s is not None and mod.bank_s.count.sum().item() == B


def test_gradient_flow_student_yes_teacher_no_bank_detached():
    mod = ICAKDLoss(C, DS, DT)
    fs, zs, ft, zt, y, ws, wt = batch(teacher_grad=True)
    for _ in range(2):  # the second step reads a filled bank
        out = mod(fs, zs, ft, zt, y, ws, wt)
        out.loss.backward()
    for name, t in (("student_features", fs), ("student_logits", zs), ("student_fc_weight", ws)):
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    assert mod.projector.weight.grad.abs().sum() > 0
    for name, t in (("teacher_features", ft), ("teacher_logits", zt), ("teacher_fc_weight", wt)):
        assert t.grad is None, name
    for buf in mod.buffers():
        assert not buf.requires_grad


def test_each_structural_term_reaches_the_student():
    for term in ("cam", "intra", "inter"):
        w = {"w_ce": 0.0, "w_kd": 0.0, "w_cam": 0.0, "w_intra": 0.0, "w_inter": 0.0}
        w["w_" + term] = 1.0
        mod = ICAKDLoss(C, DS, DT, **w)
        fs, zs, ft, zt, y, ws, wt = batch()
        mod(fs, zs, ft, zt, y, ws, wt).loss.backward()
        assert fs.grad.abs().sum() > 0, term
        if term == "cam":
            assert ws.grad.abs().sum() > 0  # the Grad-CAM weights of the student are differentiable
        else:
            assert mod.projector.weight.grad.abs().sum() > 0, term


def test_eval_mode_does_not_touch_the_bank():
    mod = ICAKDLoss(C, DS, DT).eval()
    mod(*batch())
    assert mod.bank_s.count.sum().item() == 0


def test_losses_use_previous_batches_only():
    mod = ICAKDLoss(C, DS, DT)
    first = mod(*batch(seed=1)).parts
    fresh = ICAKDLoss(C, DS, DT)
    fresh.load_state_dict(mod.state_dict())
    fresh.bank_s.reset()
    fresh.bank_t.reset()
    again = fresh(*batch(seed=1)).parts
    for k in first:  # same weights, empty banks: same numbers as the first call
        torch.testing.assert_close(first[k], again[k])


@pytest.mark.parametrize("opt", [
    dict(bank="fifo"), dict(bank=None), dict(target="teacher"), dict(correct_only=True), dict(min_count=2),
    dict(bank_dtype=torch.bfloat16), dict(cam_weighting=False), dict(method="cskd", bank="class"),
])
def test_options_run_and_give_finite_gradients(opt):
    mod = ICAKDLoss(C, DS, DT, slots_per_class=2, **opt)
    for seed in range(3):
        fs, zs, ft, zt, y, ws, wt = batch(seed=seed)
        out = mod(fs, zs, ft, zt, y, ws, wt)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(fs.grad).all()


def test_correct_only_keeps_misclassified_rows_out_of_the_bank():
    mod = ICAKDLoss(C, DS, DT, correct_only=True)
    fs, zs, ft, zt, y, ws, wt = batch()
    zt = torch.nn.functional.one_hot(y, C).float() * 10  # teacher always right
    zs = -zt.clone().requires_grad_()  # student always wrong
    mod(fs, zs, ft, zt, y, ws, wt)
    assert mod.bank_t.count.sum().item() == B and mod.bank_s.count.sum().item() == 0


def test_bad_arguments_name_the_argument():
    mod = ICAKDLoss(C, DS, DT)
    fs, zs, ft, zt, y, ws, wt = batch()
    with pytest.raises(ValueError, match="labels"):
        mod(fs, zs, ft, zt, torch.full((B,), C), ws, wt)
    with pytest.raises(ValueError, match="student_features"):
        mod(fs[:, :3], zs, ft, zt, y, ws, wt)
    with pytest.raises(ValueError, match="teacher_fc_weight"):
        mod(fs, zs, ft, zt, y, ws, wt[:, :3])
    with pytest.raises(TypeError, match="labels"):
        mod(fs, zs, ft, zt, y.float(), ws, wt)
    on_meta = ICAKDLoss(C, DS, DT).to("meta")
    with pytest.raises(ValueError, match=r"student_logits is on cpu but the loss module's banks are on meta"):
        on_meta(fs, zs, ft, zt, y, ws, wt)
    with pytest.raises(ValueError, match="method"):
        ICAKDLoss(C, DS, DT, method="fitnet")
    with pytest.raises(ValueError, match="bank"):
        ICAKDLoss(C, DS, DT, bank="ring")


def test_state_dict_holds_banks_and_projector():
    mod = ICAKDLoss(C, DS, DT)
    keys = set(mod.state_dict())
    assert {"projector.weight", "bank_s.bank", "bank_s.sums", "bank_t.count", "bank_t.ptr"} <= keys


def test_bfloat16_autocast_on_cpu():
    mod = ICAKDLoss(C, DS, DT, bank_dtype=torch.bfloat16)
    fs, zs, ft, zt, y, ws, wt = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(fs.bfloat16(), zs.bfloat16(), ft.bfloat16(), zt.bfloat16(), y, ws, wt)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0


@pytest.mark.parametrize("bank,backend", [("class", "reference"), ("fifo", "reference"), ("class", "cpp"), ("fifo", "cpp"),
                                          (None, "reference"), (None, "cpp")])
def test_compile_train_steps_match_eager_with_wraparound_and_no_recompiles(bank, backend):
    """Loss, every gradient and the banks of a compiled training step equal eager's.

    The min-cut partitioner (``aot_eager_decomp_partition``, as under Inductor) may recompute
    reads of the bank in the backward, after the same graph's enqueue has changed it.
    """
    import torch._dynamo as dynamo

    if backend == "cpp":
        pytest.importorskip("icakd_fast._C")
    dynamo.reset()
    kw = dict(slots_per_class=2, resync_every=3, bank=bank, bank_size=7, backend=backend)
    mod = ICAKDLoss(C, DS, DT, **kw)
    ref = ICAKDLoss(C, DS, DT, **kw)
    ref.load_state_dict(mod.state_dict())
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager_decomp_partition")
    with dynamo.config.patch(error_on_recompile=True):
        for step in range(6):  # 6 steps x 10 rows over 6 classes x 2 slots: the rings wrap
            args, expect_args = batch(seed=step), batch(seed=step)
            out = compiled(*args)
            out.loss.backward()
            expect = ref(*expect_args)
            expect.loss.backward()
            torch.testing.assert_close(out.loss, expect.loss)
            for name, a, b in zip(("student_features", "student_logits", "student_fc_weight"),
                                  (args[0], args[1], args[5]), (expect_args[0], expect_args[1], expect_args[5])):
                torch.testing.assert_close(a.grad, b.grad, msg=f"{name} gradient, step {step}")
            torch.testing.assert_close(mod.projector.weight.grad, ref.projector.weight.grad,
                                       msg=f"projector gradient, step {step}")
            mod.zero_grad()
            ref.zero_grad()
    if bank == "class":
        assert mod.bank_s.count.sum().item() == C * 2 and (mod.bank_s.ptr > 0).any()
    for (k, a), (_, b) in zip(mod.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


# ------------------------------------------------------------------ FeatureTap


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


def test_feature_tap_finds_last_map_and_classifier():
    net = TinyNet()
    tap = FeatureTap(net)
    net(torch.randn(2, 3, 8, 8))
    assert tap.feature_layer == "block" and tap.features.shape == (2, 6, 8, 8)
    assert tap.fc_weight is net.fc.weight
    tap.remove()
    tap.features = None
    net(torch.randn(2, 3, 8, 8))
    assert tap.features is None  # hooks gone


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer4"), ("mobilenet_v2", "features")])
def test_feature_tap_on_torchvision_models(arch, layer):
    tv = pytest.importorskip("torchvision")
    net = getattr(tv.models, arch)(num_classes=7).eval()
    with FeatureTap(net) as tap:
        net(torch.randn(1, 3, 64, 64))
        assert tap.feature_layer == layer and tap.fc_weight.shape[0] == 7


def test_feature_tap_explicit_names_and_errors():
    net = TinyNet()
    tap = FeatureTap(net, feature_layer="stem", classifier="fc")
    net(torch.randn(1, 3, 8, 8))
    assert tap.features.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="feature_layer"):
        FeatureTap(net, feature_layer="nope")
    with pytest.raises(ValueError, match="classifier"):
        FeatureTap(net, classifier="stem")


def test_unused_inputs_may_be_none():
    from icakd_fast import ICAKDLoss

    B, C = 6, 5
    zs, zt = torch.randn(B, C, requires_grad=True), torch.randn(B, C)
    y = torch.randint(0, C, (B,))
    ce = ICAKDLoss(C, 8, 12, method="ce")(None, zs, None, None, y, None, None)
    assert torch.allclose(ce.loss, torch.nn.functional.cross_entropy(zs, y))
    kd = ICAKDLoss(C, 8, 12, method="kd")(None, zs, None, zt, y, None, None)
    assert set(kd.parts) == {"ce", "kd"}
    with pytest.raises(ValueError, match="teacher_logits is required"):
        ICAKDLoss(C, 8, 12, method="kd")(None, zs, None, None, y, None, None)
    fs, ft = torch.randn(B, 8, 4, 4), torch.randn(B, 12, 4, 4)
    cskd = ICAKDLoss(C, 8, 12, method="cskd")(fs, zs, ft, zt, y, None, None)
    assert "inter" in cskd.parts
    with pytest.raises(ValueError, match="student_fc_weight is required"):
        ICAKDLoss(C, 8, 12, method="icakd")(fs, zs, ft, zt, y, None, torch.randn(C, 12))


@pytest.mark.parametrize("w_ce", [1.0, 0.5])
def test_compiled_ce_loss_keeps_its_gradient_under_inductor(w_ce):
    """``torch.compile`` (Inductor) of the CE-only loss: the loss keeps its autograd edge and
    its gradient equals eager's (``1.0 * ce`` beside ``ce`` as a part lost it)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    mod = ICAKDLoss(C, DS, DT, method="ce", w_ce=w_ce)
    logits = torch.randn(6, C, requires_grad=True)
    labels = torch.arange(6) % C
    out = torch.compile(mod)(None, logits, None, None, labels, None, None)
    out.loss.backward()
    expect = logits.detach().clone().requires_grad_(True)
    (w_ce * torch.nn.functional.cross_entropy(expect, labels)).backward()
    torch.testing.assert_close(logits.grad, expect.grad)
    torch.testing.assert_close(out.parts["ce"], torch.nn.functional.cross_entropy(expect.detach(), labels))


# ------------------------------------------------------------------ distributed (2-process gloo)

# the inter term alone, so that each rank's feature gradient is comparable with one process's
_INTER_ONLY = dict(method="cskd", w_ce=0.0, w_kd=0.0, w_intra=0.0)
_HALVES = ((0, 4), (4, B))  # uneven: rank 0 takes the first 4 rows of the global batch, rank 1 the rest


def _rows(args, start, stop):
    """The rows ``start:stop`` of a batch (features, logits and labels), as leaves."""
    return [a[start:stop].detach().clone().requires_grad_(a.requires_grad) if i < 5 else a
            for i, a in enumerate(args)]


def _cskd_ddp_worker(rank, world, init_file, out_dir):
    import datetime
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    mod = ICAKDLoss(C, DS, DT, **_INTER_ONLY)
    local = _rows(batch(seed=3), *_HALVES[rank])
    out = mod(*local)
    out.loss.backward()
    torch.save({"inter": out.parts["inter"], "grad_fs": local[0].grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # every rank has received all it needs before any rank goes
    os._exit(0)  # no process-group teardown (it hangs now and then on torch 2.6)


def test_ddp_cskd_centroids_cover_the_global_batch(tmp_path):
    """Without a bank, each rank's centroids include the other ranks' rows of the step: the inter
    term on every rank equals one process's on the whole batch, and so does the gradient of each
    rank's own feature rows."""
    import torch.multiprocessing as mp

    mp.spawn(_cskd_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = ICAKDLoss(C, DS, DT, **_INTER_ONLY)
    args = batch(seed=3)
    whole = single(*args)
    whole.loss.backward()
    for rank, (start, stop) in enumerate(_HALVES):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(res["inter"], whole.parts["inter"])
        grad = args[0].grad[start:stop]
        assert grad.abs().max() > 1e-6
        torch.testing.assert_close(res["grad_fs"], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())
        # the rank's rows alone give other centroids, so the comparison above can fail
        assert not torch.allclose(single(*_rows(args, start, stop)).parts["inter"], whole.parts["inter"])
