#!/usr/bin/env python3
"""Writes a timm SwinTransformer with random weights and its reference outputs, for the Rust
parity test (edge/tests/swin_parity.rs).

    pip install torch timm safetensors
    python scripts/make_swin_fixture.py                       # small config, committed fixture
    python scripts/make_swin_fixture.py --tiny --out /tmp/tiny  # swin_tiny at 224, not committed

The small config is chosen so that every rule of timm's Swin is exercised: a non-square input
(112x84), shifted windows with masks in the first two stages, a stage whose width is not a whole
number of windows (padding under the mask), odd stage sizes (PatchMerging pads), and stages no
larger than the window (window clamped to the stage, no shift).
"""
import argparse
import json
import os

import torch
import timm
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "edge", "tests", "fixtures", "swin_small"))
    ap.add_argument("--tiny", action="store_true", help="swin_tiny_patch4_window7_224 at 224x224")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    if args.tiny:
        cfg = dict(img_size=[224, 224], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
        batch = 1
    else:
        cfg = dict(img_size=[112, 84], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7)
        batch = 2
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **cfg).eval()
    # Random, not-too-small weights everywhere (norms and biases too), so that every parameter
    # matters to the output and a mis-mapped one cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or ".norm." in name or name.startswith("norm."):
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            elif "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
            elif p.dim() > 1:
                p.normal_(0, (1.0 / p[0].numel()) ** 0.5)
            else:
                p.normal_(0, 0.1)
    x = torch.randn(batch, 3, *cfg["img_size"])
    stages = []
    hooks = [layer.register_forward_hook(lambda m, i, o: stages.append(o.detach().clone())) for layer in model.layers]
    with torch.no_grad():
        final = model.forward_features(x)
    for h in hooks:
        h.remove()

    os.makedirs(args.out, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(args.out, "weights.safetensors"))
    outputs = {"input": x.contiguous(), "final": final.contiguous()}
    for i, s in enumerate(stages):
        outputs[f"stage{i}"] = s.contiguous()
    save_file(outputs, os.path.join(args.out, "reference.safetensors"))
    plan = [[(list(b.window_size), list(b.shift_size)) for b in layer.blocks] for layer in model.layers]
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({**cfg, "timm": timm.__version__, "torch": torch.__version__, "seed": args.seed, "window_plan": plan}, f, indent=1)
    print("wrote", args.out, {k: list(v.shape) for k, v in outputs.items()}, "plan", plan)


if __name__ == "__main__":
    main()
