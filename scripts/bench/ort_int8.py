#!/usr/bin/env python3
"""The peer for `scripts/bench/compress` (timing as in reference.py): our edge detector's architecture (timm Swin embed 48,
depths 2-2-2-2, heads 2-4-8-16, + the FPN neck and FCOS-style head of edge::detector::head) in
PyTorch, exported to ONNX and run by ONNX Runtime in FP32 and after ORT's dynamic INT8
quantization (`quantize_dynamic`, per-channel weights, QInt8), same CPU, same thread count.
Random weights: this measures speed and size, not accuracy. Prints one JSON object per line.
Needs: pip install torch timm onnx onnxruntime."""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

from reference import timed


class Head(nn.Module):
    """edge::detector::head: lateral 1x1, top-down nearest + add, 3x3 smooth, two 3x3+GN+ReLU
    towers (class, box), 3x3 outputs, exp(scale * x) * stride distances."""

    def __init__(self, in_dims=(96, 192, 384), d=64, towers=2, classes=6, strides=(8, 16, 32)):
        super().__init__()
        self.strides = strides
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c in in_dims)
        self.smooth = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in in_dims)

        def tower():
            return nn.Sequential(*[nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.GroupNorm(16, d), nn.ReLU())
                                   for _ in range(towers)])

        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_out = nn.Conv2d(d, classes, 3, padding=1)
        self.reg_out = nn.Conv2d(d, 4, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(in_dims)))

    def forward(self, feats):
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        cls, box = [], []
        for i, x in enumerate(lat):
            x = self.smooth[i](x)
            c = self.cls_out(self.cls_tower(x)).flatten(2)
            r = (self.reg_out(self.reg_tower(x)) * self.scales[i]).clamp(-6, 6).exp() * self.strides[i]
            cls.append(c)
            box.append(r.flatten(2))
        return torch.cat(cls, 2).transpose(1, 2), torch.cat(box, 2).transpose(1, 2)


class EdgeDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                                          embed_dim=48, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16])
        self.head = Head()

    def forward(self, x):
        b = self.backbone
        x = b.patch_embed(x)
        feats = []
        for layer in b.layers:
            x = layer(x)
            feats.append(x)
        # timm's Swin keeps NHWC; the neck wants NCHW, stages 1..3.
        return self.head([f.permute(0, 3, 1, 2) for f in feats[1:]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    model = EdgeDetector().eval()
    params = sum(p.numel() for p in model.parameters())
    tmp = tempfile.mkdtemp()
    fp32 = os.path.join(tmp, "edge.onnx")
    int8 = os.path.join(tmp, "edge.int8.onnx")
    with torch.no_grad():
        torch.onnx.export(model, torch.randn(1, 3, 224, 224), fp32, input_names=["x"], output_names=["cls", "box"],
                          dynamic_axes={"x": {0: "b"}, "cls": {0: "b"}, "box": {0: "b"}}, opset_version=17, dynamo=False)
    quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
    for label, path in (("onnxruntime-fp32", fp32), ("onnxruntime-dynamic-int8", int8)):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        row = dict(impl=label, params=params, bytes=os.path.getsize(path), threads=args.threads, ort=ort.__version__)
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224).numpy()
            runs = args.runs if batch == 1 else (args.runs + 1) // 2
            row[f"b{batch}_ms"] = round(timed(lambda: sess.run(None, {"x": x}), 2, runs)[0], 2)
        print(json.dumps(row))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
