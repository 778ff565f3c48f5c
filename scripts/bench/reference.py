#!/usr/bin/env python3
"""The same Swin backbones in PyTorch eager and ONNX Runtime, at the same thread count, for
scripts/bench/detector. Prints one JSON object per line. Needs: pip install torch timm onnx onnxruntime
(ONNX Runtime is skipped with a note when it is not installed)."""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import timm

CONFIGS = {
    "edge": dict(embed_dim=48, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16]),
    "tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
}


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=list(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = 3 if args.quick else 10
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
        print("onnxruntime not installed: pip install onnx onnxruntime", file=sys.stderr)
    for name, cfg in CONFIGS.items():
        if args.model and args.model != name:
            continue
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **cfg).eval()
        onnx_path = None
        if ort is not None:
            onnx_path = os.path.join(tempfile.mkdtemp(), f"{name}.onnx")
            with torch.no_grad():
                torch.onnx.export(_Features(model), torch.randn(1, 3, 224, 224), onnx_path,
                                  input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
                                  opset_version=17, dynamo=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224)
            n = runs if batch == 1 else (runs + 1) // 2
            with torch.inference_mode():
                med, best = timed(lambda: model.forward_features(x), 2, n)
            print(json.dumps(dict(impl="pytorch-eager", part="backbone", model=name, batch=batch, median_ms=round(med, 2), best_ms=round(best, 2), threads=args.threads, torch=torch.__version__)))
            if ort is not None:
                xn = x.numpy()
                med, best = timed(lambda: sess.run(None, {"x": xn}), 2, n)
                print(json.dumps(dict(impl="onnxruntime", part="backbone", model=name, batch=batch, median_ms=round(med, 2), best_ms=round(best, 2), threads=args.threads, ort=ort.__version__)))
            sys.stdout.flush()


class _Features(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


if __name__ == "__main__":
    main()
