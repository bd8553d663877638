"""python -m serve.client: classify image files through a running Triton.

  python -m serve.client [-u|--url] 127.0.0.1:8000 [-i|--protocol] http|grpc [-m|--model] ncl
      [-x|--model-version N] [--topk 5] [--batch-size 8] [--json] IMAGE|DIR...

Reads images as 8-bit RGB (16-bit ones scaled), applies the model's preprocessing (resize / center
crop to the sizes its metadata records), sends batches, and asks for the top-k through Triton's
classification extension. The short flags are those of NVIDIA's image_client.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from expertfuse.cli import positive_int, run_cli
from expertfuse.contract import KEY_PREFIX, ModelMetadata
from expertfuse.errors import UserError
from expertfuse.preprocess import graph_input, load_rgb, served_pixels
from serve.protocols import PROTOCOLS, client_module, model_config_dict, ready_model_names
from serve.repository import string_parameters

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
# The metadata fields the client reads: preprocessing only, so models exported before the contract still classify.
PREPROCESSING_FIELDS = ("mean", "std", "input_size", "resize")


class ClientError(UserError):
    """Unreachable server, unknown model, unreadable image, bad flag: one line, exit code 2."""


def _client_module(protocol: str):
    try:
        return client_module(protocol)
    except ValueError:
        raise ClientError(f"--protocol must be http or grpc, not {protocol!r}") from None


def server_address(url: str) -> str:
    """'host:port' from what users paste: 'host:port', 'http://host:port/v2', 'grpc://host:port'."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("", "http", "grpc") or not parts.hostname or port is None:
        raise ClientError(f"--url {url!r} is not a Triton address: give host:port, e.g. 127.0.0.1:8000 "
                          "(HTTP) or 127.0.0.1:8001 (gRPC)")
    return f"{parts.hostname}:{port}"


@dataclass
class ModelInfo:
    """What the client needs from the model's config: its image input, preprocessing and classes."""
    name: str
    version: str
    input_name: str
    datatype: str
    layout: str  # NHWC | NCHW
    size: int
    resize: int
    output: str
    classes: int
    max_batch_size: int


def _reachable(client, protocol: str, url: str) -> None:
    try:
        live = client.is_server_live()
    except Exception as exc:  # noqa: BLE001 - connection errors differ per protocol and library version
        raise ClientError(f"cannot reach Triton at {url} over {protocol}: {str(exc).splitlines()[0][:160]} "
                          f"(is python -m serve running, and is this its {protocol} port?)") from None
    if not live:
        raise ClientError(f"Triton at {url} is not live; wait for it or restart python -m serve")


def _model_config(client, protocol: str, model: str, version: str, url: str) -> dict:
    module = _client_module(protocol)
    try:
        return model_config_dict(client, protocol, model, version)
    except module.InferenceServerException as exc:
        served = [m["name"] if isinstance(m, dict) else m.name for m in _index(client, protocol)]
        raise ClientError(f"model {model!r}{f' version {version}' if version else ''} is not served at {url} "
                          f"(served: {', '.join(served) or 'none'}): {exc.message()[:120]}") from None


def preprocessing_sizes(params: dict[str, str], model: str, input_size: int) -> tuple[int, int]:
    """(resize, crop) from the model's expertfuse metadata; a model without any is cropped to its input."""
    props = {f"{KEY_PREFIX}{f}": params[f"{KEY_PREFIX}{f}"] for f in PREPROCESSING_FIELDS
             if f"{KEY_PREFIX}{f}" in params}
    if not props:
        return input_size, input_size
    try:
        meta = ModelMetadata.from_properties(props, classes=[])
    except (UserError, ValueError) as exc:
        raise ClientError(f"model {model!r}: unreadable metadata ({str(exc)[:120]}); re-export it with "
                          "python -m export.onnx") from None
    return int(meta.resize), int(meta.input_size)


def takes_images(cfg: dict) -> bool:
    """One UINT8 or FP32 input shaped as an image (HWC or CHW, 3 channels): what this client sends."""
    inputs = cfg.get("input", [])
    dims = [int(d) for d in inputs[0].get("dims", [])] if len(inputs) == 1 else []
    return len(dims) == 3 and 3 in (dims[0], dims[2]) and inputs[0].get("data_type") in ("TYPE_UINT8", "TYPE_FP32")


def image_models(client, protocol: str) -> list[str]:
    """The READY models that take images."""
    return [n for n in ready_model_names(client, protocol) if takes_images(_model_config(client, protocol, n, "", ""))]


def model_info(client, protocol: str, model: str, url: str, version: str = "") -> ModelInfo:
    _reachable(client, protocol, url)
    cfg = _model_config(client, protocol, model, version, url)
    if not takes_images(cfg):
        inputs = ", ".join(f"{i['name']} {i.get('data_type', '?').removeprefix('TYPE_')} {list(map(int, i['dims']))}"
                           for i in cfg.get("input", []))
        raise ClientError(f"model {model!r} does not take images (its inputs: {inputs or 'none'}); models at {url} "
                          f"that do: {', '.join(image_models(client, protocol)) or 'none'}")
    image = cfg["input"][0]
    dims = [int(d) for d in image["dims"]]
    layout = image.get("format", "FORMAT_NCHW" if dims[0] == 3 else "FORMAT_NHWC").removeprefix("FORMAT_")
    resize, size = preprocessing_sizes(string_parameters(cfg), model, dims[0] if layout == "NHWC" else dims[1])
    output = cfg["output"][0]
    return ModelInfo(model, version, image["name"], image["data_type"].removeprefix("TYPE_"), layout, size, resize,
                     output["name"], int(output["dims"][-1]), int(cfg.get("max_batch_size", 0)))


def _index(client, protocol: str):
    index = client.get_model_repository_index()
    return index.models if protocol == "grpc" else index


def collect_images(paths: list[str]) -> list[Path]:
    files = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ClientError(f"no images found in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                                  "give image files or a folder holding some")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ClientError(f"no such image or folder: {path}")
    return files


def read_images(files: list[Path], info: ModelInfo) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """(the files read, their pixels as uint8 [N, size, size, 3], why each other file was not read): one bad file
    does not stop the rest (load_rgb: 8-bit RGB, 16-bit scaled, non-images named)."""
    read, pixels, failures = [], [], []
    for f in files:
        try:
            pixels.append(served_pixels(load_rgb(f), info.resize, info.size))
        except UserError as exc:
            failures.append(str(exc))
            continue
        read.append(f)
    return read, np.stack(pixels) if pixels else None, failures


def parse_classification(entries) -> list[dict]:
    """Triton classification strings 'score:index[:label]' (bytes over gRPC) -> dicts."""
    result = []
    for entry in entries:
        text = entry.decode() if isinstance(entry, bytes) else str(entry)
        score, index, *label = text.split(":", 2)
        result.append({"score": float(score), "index": int(index), "label": label[0] if label else index})
    return result


def cap_topk(topk: int, info: ModelInfo) -> int:
    """More predictions than the model has classes are capped, and the user is told."""
    if topk > info.classes:
        print(f"note: --topk {topk} is more than model {info.name!r}'s {info.classes} classes; showing all "
              f"{info.classes}", file=sys.stderr)
    return min(topk, info.classes)


def classify(url: str, protocol: str, model: str, files: list[Path], topk: int = 5, batch_size: int = 8,
             version: str = "") -> tuple[list[dict], list[str]]:
    """(top-k of every readable file, why each other file was not read)."""
    module = _client_module(protocol)
    url = server_address(url)
    client = module.InferenceServerClient(url)
    try:
        info = model_info(client, protocol, model, url, version)
        topk = cap_topk(topk, info)
        files, pixels, failures = read_images(files, info)
        batch_size = min(batch_size, info.max_batch_size or batch_size)
        results = []
        for start in range(0, len(files), batch_size):
            batch = graph_input(pixels[start:start + batch_size], info.layout)
            if info.datatype == "FP32":
                batch = batch.astype(np.float32)
            request = module.InferInput(info.input_name, list(batch.shape), info.datatype)
            request.set_data_from_numpy(batch)
            output = module.InferRequestedOutput(info.output, class_count=topk)
            try:
                response = client.infer(model, [request], model_version=version, outputs=[output])
            except module.InferenceServerException as exc:
                raise ClientError(f"inference on {model!r} failed: {exc.message()[:200]}") from None
            for f, row in zip(files[start:start + batch_size], response.as_numpy(info.output)):
                results.append({"file": str(f), "predictions": parse_classification(row)})
        return results, failures
    finally:
        client.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-u", "--url", default="127.0.0.1:8000", help="host:port of Triton's HTTP or gRPC endpoint "
                   "(a pasted http://host:port/v2 is accepted)")
    p.add_argument("-i", "--protocol", default="http", type=str.lower, choices=PROTOCOLS)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-x", "--model-version", default="", help="version to use (default: the server's choice)")
    p.add_argument("--topk", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--json", action="store_true", help="print JSON instead of 'file  label  score' lines")
    p.add_argument("images", nargs="+", help="image files or folders")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    files = collect_images(a.images)
    results, failures = classify(a.url, a.protocol, a.model, files, a.topk, a.batch_size, a.model_version)
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            for pred in r["predictions"]:
                print(f"{r['file']}  {pred['label']}  {pred['score']:.4f}")
    for failure in failures:
        print(f"skipped: {failure}", file=sys.stderr)
    if failures:
        raise ClientError(f"{len(failures)} of {len(files)} images could not be read (each named above); "
                          f"the other {len(results)} were classified")


if __name__ == "__main__":
    sys.exit(run_cli(main))
