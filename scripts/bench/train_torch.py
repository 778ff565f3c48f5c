#!/usr/bin/env python3
"""The PyTorch side of scripts/bench/train: a training step (forward, loss, backward, AdamW) of
our edge detector's exact architecture (EdgeDetector from bench_ort_int8.py: timm Swin embed 48,
depths 2-2-2-2 + the FPN neck and FCOS-style head), batch B at 224x224, same thread count.
Loss: sigmoid focal loss on the class logits + L1 on the log box distances (the cost of a loss is
small next to the network's). Prints one JSON object. Needs: pip install torch timm."""
import argparse
import json
import statistics
import sys
import time

import torch

from ort_int8 import EdgeDetector


def focal(logits, targets, alpha=0.25, gamma=2.0):
    p = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    pt = p * targets + (1 - p) * (1 - targets)
    w = alpha * targets + (1 - alpha) * (1 - targets)
    return (w * (1 - pt) ** gamma * ce).sum() / max(1.0, targets.sum().item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--bf16", action="store_true", help="autocast forward and backward to bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = EdgeDetector().train().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
    x = torch.randn(args.batch, 3, 224, 224, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16)
    with torch.no_grad():
        cls, box = model(x)
    targets = (torch.rand_like(cls) > 0.995).float()
    box_targets = torch.rand_like(box) * 64 + 1
    times = []
    for step in range(args.steps + 2):
        sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            cls, box = model(x)
        cls, box = cls.float(), box.float()
        loss = focal(cls, targets) + (box.log() - box_targets.log()).abs().mean()
        loss.backward()
        opt.step()
        sync()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps(dict(impl="pytorch", torch=torch.__version__, device=args.device, bf16=args.bf16, threads=args.threads, batch=args.batch,
                          steps=args.steps, step_ms=round(med * 1e3, 1),
                          images_per_second=round(args.batch / med, 2),
                          images_per_second_mean=round(args.batch * len(times) / sum(times), 2))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
