"""ICAKD dropped into an existing training loop.

The loop below is an ordinary supervised loop (model, optimiser, loader, cross-entropy); the
lines marked ``# ICAKD`` are all that distillation adds: a frozen teacher, two ``FeatureTap``
hooks that capture each network's last feature map and classifier, and ``ICAKDLoss`` in place
of the cross-entropy. The networks are the package's small CIFAR ResNets (resnet20 teaching
resnet8, random weights) and the data are random 32x32 images, so it runs anywhere:

    python examples/drop_in.py            # CPU, or the GPU when there is one
    python examples/drop_in.py --steps 2  # a quick check (what tests/test_examples.py runs)
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from icakd_fast import FeatureTap, ICAKDLoss
from icakd_fast.train.models import build_model

NUM_CLASSES = 10


def synthetic_loader(num_images: int, batch_size: int, seed: int = 0) -> DataLoader:
    """Random images with random labels, standing in for a real dataset."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, 3, 32, 32, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (num_images,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True, drop_last=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    student = build_model("resnet8", NUM_CLASSES).to(device)
    teacher = build_model("resnet20", NUM_CLASSES).to(device)  # ICAKD: in practice, a trained teacher
    teacher.eval().requires_grad_(False)  # ICAKD: the teacher is frozen
    s_tap, t_tap = FeatureTap(student), FeatureTap(teacher)  # ICAKD: last feature map + classifier
    criterion = ICAKDLoss(NUM_CLASSES, student_dim=s_tap.dim, teacher_dim=t_tap.dim).to(device)  # ICAKD
    # ICAKD: the loss owns a learnable projector (student -> teacher width): optimise it too
    params = list(student.parameters()) + list(criterion.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)

    loader = synthetic_loader(args.steps * args.batch_size, args.batch_size)
    student.train()
    criterion.train()  # in train mode each call enqueues the batch into the memory banks
    for step, (images, labels) in enumerate(loader, 1):
        images, labels = images.to(device), labels.to(device)
        with torch.no_grad():
            t_logits = teacher(images)  # ICAKD
        s_logits = student(images)
        out = criterion(s_tap.features, s_logits, t_tap.features, t_logits, labels,  # ICAKD
                        s_tap.fc_weight, t_tap.fc_weight)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        parts = " ".join(f"{k} {v.item():.4f}" for k, v in out.parts.items())
        print(f"step {step:3d}  loss {out.loss.item():.4f}  ({parts})", flush=True)

    filled = int((criterion.bank_t.count > 0).sum())
    print(f"done on {device}: {step} steps; the teacher bank holds samples of {filled} of {NUM_CLASSES} classes")


if __name__ == "__main__":
    main()
