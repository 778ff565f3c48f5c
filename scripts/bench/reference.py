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
    "nano": dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4]),
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda (PyTorch only; ONNX Runtime stays on the CPU)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = 3 if args.quick else 10
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batches = [int(b) for b in args.batches.split(",")]
    try:
        if dev.type != "cpu":
            raise ImportError
        import onnxruntime as ort
    except ImportError:
        ort = None
        print("onnxruntime not installed: pip install onnx onnxruntime", file=sys.stderr)
    for name, cfg in CONFIGS.items():
        if args.model and args.model != name:
            continue
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **cfg).eval().to(dev)
        onnx_path = None
        if ort is not None:
            onnx_path = os.path.join(tempfile.mkdtemp(), f"{name}.onnx")
            with torch.no_grad():
                torch.onnx.export(_Features(model), torch.randn(1, 3, 224, 224, device=dev), onnx_path,
                                  input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
                                  opset_version=17, dynamo=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224, device=dev)
            n = runs if batch == 1 else (runs + 1) // 2

            def step():
                model.forward_features(x)
                sync()

            with torch.inference_mode():
                med, best = timed(step, 2, n)
            print(json.dumps(dict(impl="pytorch-eager", part="backbone", model=name, batch=batch, device=args.device, median_ms=round(med, 2), best_ms=round(best, 2), frames_per_s=round(batch / med * 1e3, 1), threads=args.threads, torch=torch.__version__)))
            if ort is not None:
                xn = x.cpu().numpy()
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
