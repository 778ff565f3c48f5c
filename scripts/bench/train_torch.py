#!/usr/bin/env python3
"""The PyTorch side of scripts/bench/train: a training step (forward, loss, backward, AdamW) of
our edge detector's exact architecture (EdgeDetector from ort_int8.py: timm Swin embed 48,
depths 2-2-2-2 + the FPN neck and FCOS-style head), batch B at 224x224, same thread count.
Loss: the same terms as ours (edge/detector/src/loss.rs): quality focal loss (beta 2) on the class
logits against IoU-valued targets at the positive locations, plus 2 x GIoU loss on their boxes,
both over the number of positives. Step time: the median over the measured steps, after the same
warm-up steps as ours. Prints one JSON object. Needs: pip install torch timm."""
import argparse
import json
import statistics
import sys
import time

import torch

from ort_int8 import EdgeDetector


def quality_focal(logits, score, beta=2.0):
    p = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, score, reduction="none")
    return ((score - p).abs().pow(beta) * ce).sum()


def iou_giou(pred, target):
    """IoU and GIoU of boxes given as ltrb distances from the same location, [N, 4]."""
    lt = torch.minimum(pred[:, :2], target[:, :2]) + torch.minimum(pred[:, 2:], target[:, 2:])
    inter = lt[:, 0] * lt[:, 1]
    area = lambda d: (d[:, 0] + d[:, 2]) * (d[:, 1] + d[:, 3])
    union = area(pred) + area(target) - inter
    iou = inter / union
    hull_wh = torch.maximum(pred[:, :2], target[:, :2]) + torch.maximum(pred[:, 2:], target[:, 2:])
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou, iou - (hull - union) / hull


def detection_loss(cls, box, targets, box_targets):
    pos = targets.amax(-1) > 0
    num_pos = max(1.0, float(pos.sum()))
    iou, giou = iou_giou(box[pos], box_targets[pos])
    score = targets.clone()
    score[pos] = targets[pos] * iou.detach().clamp(min=0).unsqueeze(-1)
    return quality_focal(cls, score) / num_pos + 2.0 * (1 - giou).sum() / num_pos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2, help="steps run before the measured ones")
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
    for step in range(args.steps + args.warmup):
        sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast():
            cls, box = model(x)
        cls, box = cls.float(), box.float()
        loss = detection_loss(cls, box, targets, box_targets)
        loss.backward()
        opt.step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps(dict(impl="pytorch", torch=torch.__version__, device=args.device, bf16=args.bf16, threads=args.threads, batch=args.batch,
                          steps=args.steps, step_ms=round(med * 1e3, 1),
                          images_per_second=round(args.batch / med, 2),
                          images_per_second_mean=round(args.batch * len(times) / sum(times), 2))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
