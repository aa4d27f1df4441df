"""A Python client of a flowerx model with nothing but onnxruntime, Pillow and numpy, as its README shows:
decode to RGB (EXIF orientation, sRGB, alpha on white) at the photo's own size and feed it; the model
resizes and normalises by itself (contract 2). No flowerx import.

Usage: python plain_onnxruntime.py MODEL LIST.json OUT.json [PIXELS.u8 SIZE]   (see node_classify.mjs)
"""

import io
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageCms, ImageOps


def decode(path: str) -> np.ndarray:
    image = Image.open(path)
    icc = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image)
    if icc and image.mode == "RGB":  # the embedded colour profile -> sRGB
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        image = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"))
    if image.mode in ("RGBA", "LA", "P"):  # transparency on white
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    return np.asarray(image.convert("RGB"))


def main(model: str, list_file: str, out_file: str, pixels_file: str | None = None, size: str = "0") -> None:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    paths = json.load(open(list_file))
    pixels = np.fromfile(pixels_file, np.uint8).reshape(-1, int(size), int(size), 3) if pixels_file else None
    probs, errors, labels = [], {}, None
    for i, path in enumerate(paths):
        try:
            image = pixels[i] if pixels is not None else decode(path)
            p, names = session.run(["probs", "labels"], {"image": image[None]})
            probs.append(p[0].tolist())
            labels = labels or json.loads(names.tobytes().decode("utf-8"))
        except Exception as e:
            probs.append(None)
            errors[i] = str(e)
    json.dump({"probs": probs, "labels": labels, "errors": errors}, open(out_file, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
