// flowerx web: classify a photo in the browser with onnxruntime-web (wasm). The model does its own resizing
// and normalisation (flowerx model contract 2), so this page only decodes: to RGB uint8, sRGB, upright,
// alpha on white, at the photo's own size. Nothing leaves the page.
"use strict";
(() => {
  const { setStatus, onPhoto } = window.flowerxPage; // page.js: status line, bars, drop/paste/choose
  const TOP_K = 5;
  // Where the wasm runtime is, as an absolute URL (onnxruntime-web resolves a relative one against its script).
  ort.env.wasm.wasmPaths = new URL(window.FLOWERX_WASM_PATHS, document.baseURI).href;
  let session = null;
  let labels = null;

  const ready = (async () => {
    session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
    // The labels are the model's second output (UTF-8 JSON bytes); one run also warms the session up.
    const grey = new ort.Tensor("uint8", new Uint8Array(3).fill(128), [1, 1, 1, 3]);
    const out = await session.run({ image: grey });
    labels = JSON.parse(new TextDecoder().decode(out.labels.data));
    setStatus("Ready: drop, paste or choose a photo.");
  })();
  ready.catch((e) => setStatus(`The model did not load: ${e.message || e}`, true));

  // Decoded pixels of an image file: RGB uint8, sRGB, EXIF orientation applied, transparency on white.
  async function pixelsOf(blob) {
    const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image", colorSpaceConversion: "default" });
    const { width, height } = bitmap;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d", { colorSpace: "srgb", willReadFrequently: true });
    context.fillStyle = "#ffffff";
    context.fillRect(0, 0, width, height);
    context.drawImage(bitmap, 0, 0);
    bitmap.close();
    const rgba = context.getImageData(0, 0, width, height, { colorSpace: "srgb" }).data;
    const rgb = new Uint8Array(width * height * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
      rgb[j] = rgba[i];
      rgb[j + 1] = rgba[i + 1];
      rgb[j + 2] = rgba[i + 2];
    }
    return { rgb, height, width };
  }

  // Probabilities for decoded pixels [height, width, 3], and the predictions ranked best first.
  async function classifyPixels(rgb, height, width) {
    await ready;
    const image = new ort.Tensor("uint8", rgb, [1, height, width, 3]);
    const probs = Array.from((await session.run({ image }, ["probs"])).probs.data);
    const order = probs.map((_, i) => i).sort((a, b) => probs[b] - probs[a]);
    return { probs, predictions: order.map((i) => ({ label: labels[i], score: probs[i] })) };
  }

  async function classify(blob) {
    await ready;
    const start = performance.now();
    const { rgb, height, width } = await pixelsOf(blob);
    const decoded = performance.now();
    const result = await classifyPixels(rgb, height, width);
    const end = performance.now();
    return { ...result, width, height, decode_ms: decoded - start, model_ms: end - decoded, ms: end - start };
  }

  onPhoto(async (file) => {
    const result = await classify(file);
    const status =
      `${result.width} x ${result.height} photo classified in ${result.ms.toFixed(0)} ms ` +
      `(decode ${result.decode_ms.toFixed(0)} ms, model ${result.model_ms.toFixed(0)} ms).`;
    return { predictions: result.predictions.slice(0, TOP_K), status };
  });

  // For scripts and tests driving the page: the same decode and model as a dropped photo.
  window.flowerx = {
    ready,
    classify,
    classifyPixels,
    pixelsOf,
    get labels() {
      return labels;
    },
  };
})();
