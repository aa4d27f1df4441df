// A Node client of a flowerx model, as its README shows: sharp decodes (EXIF orientation, sRGB, alpha on
// white), onnxruntime-node runs the model, which resizes and normalises by itself (model contract 2).
// Usage: node node_classify.mjs MODEL LIST.json OUT.json [PIXELS.u8 SIZE]
//   LIST.json: image paths; OUT.json: {"probs": [[...], ...], "labels": [...], "errors": {index: message}}.
//   With PIXELS.u8 (uint8 [N, SIZE, SIZE, 3] in list order), those pixels are fed instead of decoding.
import fs from "node:fs";
import ort from "onnxruntime-node";
import sharp from "sharp";

const [model, listFile, outFile, pixelsFile, size] = process.argv.slice(2);
const session = await ort.InferenceSession.create(model);
const paths = JSON.parse(fs.readFileSync(listFile, "utf8"));
const pixels = pixelsFile ? fs.readFileSync(pixelsFile) : null;
const probs = [];
const errors = {};
let labels = null;

async function decode(path) {
  const { data, info } = await sharp(path)
    .rotate() // EXIF orientation
    .flatten({ background: "#ffffff" }) // alpha on white
    .toColourspace("srgb") // embedded ICC profiles are converted to sRGB
    .raw()
    .toBuffer({ resolveWithObject: true });
  if (info.channels !== 3) throw new Error(`${info.channels} channels`);
  return new ort.Tensor("uint8", new Uint8Array(data.buffer, data.byteOffset, data.length), [1, info.height, info.width, 3]);
}

for (const [i, path] of paths.entries()) {
  try {
    let image;
    if (pixels) {
      const n = Number(size) * Number(size) * 3;
      image = new ort.Tensor("uint8", new Uint8Array(pixels.buffer, pixels.byteOffset + i * n, n), [1, Number(size), Number(size), 3]);
    } else {
      image = await decode(path);
    }
    const out = await session.run({ image });
    probs.push(Array.from(out.probs.data));
    labels ??= JSON.parse(new TextDecoder().decode(out.labels.data)); // the labels output: UTF-8 JSON
  } catch (e) {
    probs.push(null);
    errors[i] = String(e.message || e);
  }
}
fs.writeFileSync(outFile, JSON.stringify({ probs, labels, errors }));
