"""`flowerx export web`: a static folder that classifies photos in the browser with onnxruntime-web (wasm).

The folder holds index.html, flowerx.js (the page's script: decode and run), page.js (show the top 5; shared
with flowerx serve's page), flowerx.css, the model and its labels. It works from any static server
(`python -m http.server`), never from file:// (browsers refuse wasm there). onnxruntime-web comes from a CDN
at a pinned version with its integrity hash, or, for offline use, is copied from a local node_modules.
No TensorFlow, no onnx: a serving install exports.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import FlowerxError
from .fileio import atomic_write, check_outputs, read_regular

ORT_WEB_VERSION = "1.30.0"
ORT_WEB_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
ORT_SCRIPT = "ort.wasm.min.js"  # the wasm-only build: a global `ort`, 50 KB
# sha384 of onnxruntime-web 1.30.0's dist/ort.wasm.min.js, as npm ships it (the CDN serves npm's files);
# tests/test_web.py checks it against the package that `npm ci` installs.
ORT_SCRIPT_SRI = "sha384-Bw6URI+Gvoadw0do7/QrSHUC9D1vCYYK5OSqChFyhyV5mzPL4oe2rOAFljAnS8Sq"
# What the script loads itself at run time (from wasmPaths): the wasm binary and its loader.
ORT_RUNTIME_FILES = ("ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
MARKER = ".flowerx-web"  # says a folder is a flowerx web export, so a later export may write into it again
PAGE_FILES = ("index.html", "flowerx.js", "page.js", "flowerx.css")


@dataclass
class WebExport:
    out: Path
    files: list[str]  # relative to out
    ort: str  # where onnxruntime-web comes from: the CDN address, or the local copy's version


def find_ort_web(path: str | os.PathLike) -> tuple[Path, str]:
    """The dist folder and version of onnxruntime-web under path: a node_modules folder, the package's folder,
    or its dist/ folder."""
    path = Path(path).expanduser()
    for package in (path / "onnxruntime-web", path, path.parent):
        dist = package / "dist"
        if (package / "package.json").is_file() and all((dist / f).is_file() for f in (ORT_SCRIPT, *ORT_RUNTIME_FILES)):
            try:
                version = json.loads((package / "package.json").read_text("utf-8"))["version"]
            except (OSError, ValueError, KeyError, TypeError):
                raise FlowerxError(f"{package / 'package.json'}: unreadable package.json") from None
            return dist, str(version)
    raise FlowerxError(
        f"no onnxruntime-web under {path} (with dist/{ORT_SCRIPT}): give a node_modules folder where "
        f"`npm install onnxruntime-web@{ORT_WEB_VERSION}` ran"
    )


def _check_folder(out: Path) -> None:
    """out must be new, empty, or an earlier flowerx web export: nothing else is written into."""
    if out.exists() and not out.is_dir():
        raise FlowerxError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FlowerxError(f"--out {out} is a folder with files that flowerx did not write: give a new or empty one")


def _page(predictor, ort_src: str, integrity: str, wasm_paths: str) -> str:
    contract = predictor.contract
    labels = contract.labels
    shown = ", ".join(labels[:12]) + (f", ... ({len(labels)} in all)" if len(labels) > 12 else "")
    accuracy = contract.training.get("test_accuracy")
    tested = f" Test accuracy {accuracy * 100:.1f}%." if isinstance(accuracy, (int, float)) else ""
    values = {
        "title": f"{contract.architecture or 'flowerx'} classifier, {len(labels)} classes",
        "about": f"Classes: {shown}.{tested} Runs in this page with onnxruntime-web; the photo never leaves it.",
        "ort_src": ort_src,
        "wasm_paths": wasm_paths,
    }
    page = resources.files("flowerx").joinpath("web/index.html").read_text("utf-8")
    for key, value in values.items():
        page = page.replace("{{" + key + "}}", html.escape(value, quote=True))
    attributes = f' integrity="{integrity}" crossorigin="anonymous"' if integrity else ""
    return page.replace("{{ort_integrity}}", attributes)


def export_web(
    graph: str | os.PathLike, out: str | os.PathLike, ort_from: str | os.PathLike | None = None
) -> WebExport:
    """Write the static classifier page for a contract-2 model into out (see the module's doc)."""
    from .predictor import Predictor

    graph, out = Path(graph).expanduser(), Path(out).expanduser()
    predictor = Predictor(graph, providers="cpu")
    if not predictor.any_size:
        raise FlowerxError(
            f"{graph.name} follows model contract {predictor.contract.version} (a fixed {predictor.input_size} x "
            f"{predictor.input_size} input): the web page needs contract 2, which flowerx 0.2+ writes; retrain it"
        )
    _check_folder(out)
    dist, version = find_ort_web(ort_from) if ort_from else (None, ORT_WEB_VERSION)
    copied = {f"ort/{name}": dist / name for name in (ORT_SCRIPT, *ORT_RUNTIME_FILES)} if dist else {}
    outputs = {name: out / name for name in ("model.onnx", "labels.txt", *PAGE_FILES, MARKER, *copied)}
    check_outputs(outputs, {"--graph": graph})
    if dist:
        page = _page(predictor, f"ort/{ORT_SCRIPT}", "", "ort/")
    else:
        page = _page(predictor, ORT_WEB_CDN + ORT_SCRIPT, ORT_SCRIPT_SRI, ORT_WEB_CDN)
    web = resources.files("flowerx").joinpath("web")
    contents = {
        "model.onnx": read_regular(graph),
        "labels.txt": ("\n".join(predictor.labels) + "\n").encode("utf-8"),
        "index.html": page.encode("utf-8"),
        **{name: web.joinpath(name).read_bytes() for name in PAGE_FILES[1:]},
        **{name: read_regular(source) for name, source in copied.items()},
    }
    atomic_write(out / MARKER, json.dumps({"onnxruntime_web": version, "local": bool(dist)}).encode())
    for name, data in contents.items():
        atomic_write(out / name, data)
    return WebExport(out, [*contents, MARKER], f"onnxruntime-web {version} (local copy)" if dist else ORT_WEB_CDN)
