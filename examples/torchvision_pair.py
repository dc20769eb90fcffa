"""A torchvision teacher/student pair: ResNet-34 teaching ResNet-18.

``FeatureTap`` finds the last feature map (``layer4``) and the classifier (``fc``) of a
torchvision ResNet by itself. The models have random weights and 10 classes, the images are
random 64x64 tensors: the point is the wiring, which is the same for pretrained ImageNet models
at 224x224 (load the teacher's weights, set ``num_classes=1000``). Also shown: the baselines
through ``method=`` ("ce", "kd", "cskd", "icakd") and the memory bank stored in bfloat16.

    python examples/torchvision_pair.py                      # 2 steps of each method
    python examples/torchvision_pair.py --steps 1 --methods kd,icakd
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from icakd_fast import FeatureTap, ICAKDLoss

NUM_CLASSES = 10


def distil(method: str, steps: int, batch_size: int, image_size: int, device: torch.device) -> float:
    torch.manual_seed(0)
    teacher = torchvision.models.resnet34(weights=None, num_classes=NUM_CLASSES).to(device)
    student = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES).to(device)
    teacher.eval().requires_grad_(False)
    with FeatureTap(teacher) as t_tap, FeatureTap(student) as s_tap:  # hooks removed on exit
        criterion = ICAKDLoss(NUM_CLASSES, s_tap.dim, t_tap.dim, method=method, slots_per_class=8,
                              bank_dtype=torch.bfloat16).to(device)
        opt = torch.optim.SGD(list(student.parameters()) + list(criterion.parameters()), lr=0.001, momentum=0.9)
        student.train()
        criterion.train()
        for _ in range(steps):
            images = torch.randn(batch_size, 3, image_size, image_size, device=device)
            labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
            with torch.no_grad():
                t_logits = teacher(images)
            s_logits = student(images)
            out = criterion(s_tap.features, s_logits, t_tap.features, t_logits, labels, s_tap.fc_weight, t_tap.fc_weight)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        parts = ", ".join(f"{k} {v.item():.4f}" for k, v in out.parts.items())
        print(f"{method:6s} last loss {out.loss.item():8.4f}  ({parts}); feature maps "
              f"{tuple(s_tap.features.shape)} from {s_tap.feature_layer!r}, {tuple(t_tap.features.shape)} from "
              f"{t_tap.feature_layer!r}", flush=True)
    return out.loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="training steps per method (default 2)")
    ap.add_argument("--methods", default="ce,kd,cskd,icakd", help="comma-separated ICAKDLoss methods")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    for method in args.methods.split(","):
        distil(method.strip(), args.steps, args.batch_size, args.image_size, torch.device(args.device))


if __name__ == "__main__":
    main()
