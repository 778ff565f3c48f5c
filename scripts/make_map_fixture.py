#!/usr/bin/env python3
"""Writes trainer/tests/fixtures/map_fixture.json: random ground truth and predictions, with the
mAP values computed by reference implementations, for the Rust evaluation test.

- VOC mAP@0.5, all-point interpolation: the PASCAL VOC devkit's algorithm as in the widely used
  `voc_eval.py` (py-faster-rcnn), `use_07_metric=False`, continuous coordinates (no +1 pixel).
  Difficult boxes are neither matched nor missed.
- COCO mAP@[.5:.95] and AP@.5 (101-point): pycocotools 2.0.x COCOeval on the same data, with
  difficult boxes passed as iscrowd=1 (COCO's way of ignoring a region).

    pip install numpy pycocotools
    python scripts/make_map_fixture.py
"""
import json
import os

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def voc_ap(rec, prec):
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def voc_eval(gts, dets, cls, thresh=0.5):
    recs = {}
    npos = 0
    for g in gts:
        if g["class"] != cls:
            continue
        r = recs.setdefault(g["image"], {"bbox": [], "difficult": [], "det": []})
        r["bbox"].append(g["bbox"])
        r["difficult"].append(g["difficult"])
        r["det"].append(False)
        npos += 0 if g["difficult"] else 1
    ds = [d for d in dets if d["class"] == cls]
    conf = np.array([d["score"] for d in ds])
    order = np.argsort(-conf, kind="mergesort")
    ds = [ds[i] for i in order]
    tp = np.zeros(len(ds))
    fp = np.zeros(len(ds))
    for k, d in enumerate(ds):
        r = recs.get(d["image"])
        bb = np.array(d["bbox"], dtype=float)
        ovmax = -np.inf
        if r is not None and len(r["bbox"]):
            bbgt = np.array(r["bbox"], dtype=float)
            ixmin = np.maximum(bbgt[:, 0], bb[0])
            iymin = np.maximum(bbgt[:, 1], bb[1])
            ixmax = np.minimum(bbgt[:, 2], bb[2])
            iymax = np.minimum(bbgt[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin, 0.0)
            ih = np.maximum(iymax - iymin, 0.0)
            inters = iw * ih
            uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (bbgt[:, 2] - bbgt[:, 0]) * (bbgt[:, 3] - bbgt[:, 1]) - inters
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > thresh:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp[k] = 1.0
                    r["det"][jmax] = True
                else:
                    fp[k] = 1.0
        else:
            fp[k] = 1.0
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    if npos == 0:
        return None
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return float(voc_ap(rec, prec))


def main():
    rng = np.random.default_rng(11)
    classes = ["a", "b", "c", "d"]  # "d" has predictions but no ground truth
    gts, dets = [], []
    for image in range(30):
        for _ in range(rng.integers(0, 5)):
            cls = int(rng.integers(0, 3))
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(5, 60, 2)
            g = {"image": image, "class": cls, "bbox": [round(float(v), 3) for v in (x, y, x + w, y + h)],
                 "difficult": bool(rng.random() < 0.1)}
            gts.append(g)
            # Several predictions near each box (some good, some poor), plus noise.
            for _ in range(rng.integers(0, 4)):
                j = rng.normal(0, rng.choice([1.0, 3.0, 10.0]), 4)
                b = np.array(g["bbox"]) + j
                b[2], b[3] = max(b[2], b[0] + 1), max(b[3], b[1] + 1)
                dets.append({"image": image, "class": cls if rng.random() < 0.85 else int(rng.integers(0, 4)),
                             "bbox": [round(float(v), 3) for v in b], "score": round(float(rng.random()), 6)})
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(5, 60, 2)
            dets.append({"image": image, "class": int(rng.integers(0, 4)),
                         "bbox": [round(float(v), 3) for v in (x, y, x + w, y + h)], "score": round(float(rng.random()), 6)})
    # Scores must be distinct so that every implementation sorts them the same way.
    scores = [d["score"] for d in dets]
    assert len(set(scores)) == len(scores)

    voc = {c: voc_eval(gts, dets, i) for i, c in enumerate(classes)}
    voc_valid = [v for v in voc.values() if v is not None]

    coco_gt = {"images": [{"id": i + 1} for i in range(30)],
               "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)],
               "annotations": []}
    for n, g in enumerate(gts):
        x1, y1, x2, y2 = g["bbox"]
        coco_gt["annotations"].append({"id": n + 1, "image_id": g["image"] + 1, "category_id": g["class"] + 1,
                                       "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                       "iscrowd": int(g["difficult"])})
    coco = COCO()
    coco.dataset = coco_gt
    coco.createIndex()
    coco_dt = coco.loadRes([{"image_id": d["image"] + 1, "category_id": d["class"] + 1,
                             "bbox": [d["bbox"][0], d["bbox"][1], d["bbox"][2] - d["bbox"][0], d["bbox"][3] - d["bbox"][1]],
                             "score": d["score"]} for d in dets])
    ev = COCOeval(coco, coco_dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, 2]  # T x R x K, area all, maxDets 100
    per_class = []
    for k in range(len(classes)):
        p = precision[:, :, k]
        per_class.append(float(np.mean(p[p > -1])) if (p > -1).any() else None)
    out = {
        "classes": classes,
        "ground_truth": gts,
        "predictions": dets,
        "voc_ap50": voc,
        "voc_map50": float(np.mean(voc_valid)),
        "coco_map50_95": float(ev.stats[0]),
        "coco_ap50": float(ev.stats[1]),
        "coco_ap50_95_per_class": per_class,
    }
    path = os.path.join(os.path.dirname(__file__), "..", "trainer", "tests", "fixtures", "map_fixture.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=0)
    print("wrote", path, {k: out[k] for k in ("voc_map50", "coco_map50_95", "coco_ap50")})


if __name__ == "__main__":
    main()
