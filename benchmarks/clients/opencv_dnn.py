"""An OpenCV client of a flowerx model: cv2.imread decodes (EXIF orientation applied; embedded colour
profiles ignored, as OpenCV does), cv2.dnn runs the model.

OpenCV 5's DNN reads the model's in-graph Resize but ignores its antialiasing, so a client resizes to
S x S itself with INTER_AREA (the README's advice) and the graph's resize then passes the pixels unchanged;
--resize none feeds the full-size image instead (to measure what ignoring antialiasing costs).
OpenCV 4's DNN cannot read a model with a dynamic input size at all (its Shape layer refuses it).

Usage: python opencv_dnn.py MODEL LIST.json OUT.json SIZE [--resize area|none] [--pixels PIXELS.u8]
"""

import argparse
import json

import cv2
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model", "list_file", "out_file"):
        parser.add_argument(name)
    parser.add_argument("size", type=int)
    parser.add_argument("--resize", choices=("area", "none"), default="area")
    parser.add_argument("--pixels")
    args = parser.parse_args()
    net = cv2.dnn.readNetFromONNX(args.model)
    names = list(net.getUnconnectedOutLayersNames())
    paths = json.load(open(args.list_file))
    s = args.size
    pixels = np.fromfile(args.pixels, np.uint8).reshape(-1, s, s, 3) if args.pixels else None
    probs, errors, labels = [], {}, None
    for i, path in enumerate(paths):
        try:
            if pixels is not None:
                rgb = pixels[i]
            else:
                rgb = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                if args.resize == "area":
                    rgb = cv2.resize(rgb, (s, s), interpolation=cv2.INTER_AREA)
            net.setInput(np.ascontiguousarray(rgb[None]))
            outputs = dict(zip(names, net.forward(names)))
            probs.append(outputs["probs"].reshape(-1).tolist())
            labels = labels or json.loads(outputs["labels"].astype(np.uint8).tobytes().decode("utf-8"))
        except Exception as e:
            probs.append(None)
            errors[i] = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
    json.dump({"probs": probs, "labels": labels, "errors": errors}, open(args.out_file, "w"))


if __name__ == "__main__":
    main()
