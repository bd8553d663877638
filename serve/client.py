"""python -m serve.client: classify image files through a running Triton.

  python -m serve.client --url 127.0.0.1:8000 --protocol http|grpc --model ncl [--topk 5] [--batch-size 8] [--json] IMAGE|DIR...

Reads images with PIL, applies the model's preprocessing (resize / center crop to the input size the
model records), sends batches, and asks for the top-k through Triton's classification extension.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from expertfuse.preprocess import pixel_transform, to_model_input

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class ClientError(Exception):
    """Unreachable server, unknown model, unreadable image: one line, exit code 2."""


def _client_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ClientError("--protocol must be http or grpc")
    return module


@dataclass
class ModelInfo:
    """What the client needs from the model's config: its image input and preprocessing."""
    name: str
    input_name: str
    datatype: str
    layout: str  # NHWC | NCHW
    size: int
    resize: int
    output: str
    max_batch_size: int


def model_info(client, protocol: str, model: str, url: str) -> ModelInfo:
    module = _client_module(protocol)
    try:
        if not client.is_server_live():
            raise ClientError(f"Triton at {url} is not live")
    except ClientError:
        raise
    except Exception as exc:  # noqa: BLE001 - connection errors differ per protocol and library version
        raise ClientError(f"cannot reach Triton at {url} over {protocol}: {str(exc).splitlines()[0][:160]}") from None
    try:
        cfg = client.get_model_config(model)
    except module.InferenceServerException as exc:
        served = [m["name"] if isinstance(m, dict) else m.name for m in _index(client, protocol)]
        raise ClientError(f"model {model!r} is not served at {url} (served: {', '.join(served) or 'none'}): "
                          f"{exc.message()[:120]}") from None
    if protocol == "grpc":
        from google.protobuf.json_format import MessageToDict
        cfg = MessageToDict(cfg.config, preserving_proto_field_name=True)
    image = cfg["input"][0]
    dims = [int(d) for d in image["dims"]]
    layout = image.get("format", "FORMAT_NCHW" if dims[0] == 3 else "FORMAT_NHWC").removeprefix("FORMAT_")
    size = dims[0] if layout == "NHWC" else dims[1]
    params = cfg.get("parameters", {})
    resize = int(params.get("expertfuse_resize", {}).get("string_value", size))
    return ModelInfo(model, image["name"], image["data_type"].removeprefix("TYPE_"), layout, size, resize,
                     cfg["output"][0]["name"], int(cfg.get("max_batch_size", 0)))


def _index(client, protocol: str):
    index = client.get_model_repository_index()
    return index.models if protocol == "grpc" else index


def collect_images(paths: list[str]) -> list[Path]:
    files = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise ClientError(f"no such image or folder: {path}")
    if not files:
        raise ClientError("no images found")
    return files


def load_pixels(files: list[Path], info: ModelInfo) -> torch.Tensor:
    transform = pixel_transform(info.resize, info.size)
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(transform(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise ClientError(f"cannot read image {f}: {exc}") from None
    return torch.stack(images)


def parse_classification(entries) -> list[dict]:
    """Triton classification strings 'score:index[:label]' (bytes over gRPC) -> dicts."""
    result = []
    for entry in entries:
        text = entry.decode() if isinstance(entry, bytes) else str(entry)
        score, index, *label = text.split(":", 2)
        result.append({"score": float(score), "index": int(index), "label": label[0] if label else index})
    return result


def classify(url: str, protocol: str, model: str, files: list[Path], topk: int = 5, batch_size: int = 8) -> list[dict]:
    module = _client_module(protocol)
    client = module.InferenceServerClient(url)
    try:
        info = model_info(client, protocol, model, url)
        pixels = load_pixels(files, info)
        batch_size = max(1, min(batch_size, info.max_batch_size or batch_size))
        results = []
        for start in range(0, len(files), batch_size):
            batch = to_model_input(pixels[start:start + batch_size], info.layout)
            if info.datatype == "FP32":
                batch = batch.astype(np.float32)
            request = module.InferInput(info.input_name, list(batch.shape), info.datatype)
            request.set_data_from_numpy(batch)
            output = module.InferRequestedOutput(info.output, class_count=topk)
            try:
                response = client.infer(model, [request], outputs=[output])
            except module.InferenceServerException as exc:
                raise ClientError(f"inference failed: {exc.message()[:200]}") from None
            for f, row in zip(files[start:start + batch_size], response.as_numpy(info.output)):
                results.append({"file": str(f), "predictions": parse_classification(row)})
        return results
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8000", help="host:port of Triton's HTTP or gRPC endpoint")
    p.add_argument("--protocol", default="http", choices=["http", "grpc"])
    p.add_argument("--model", required=True)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print JSON instead of 'file  label  score' lines")
    p.add_argument("images", nargs="+", help="image files or folders")
    a = p.parse_args(argv)
    try:
        results = classify(a.url, a.protocol, a.model, collect_images(a.images), a.topk, a.batch_size)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            for pred in r["predictions"]:
                print(f"{r['file']}  {pred['label']}  {pred['score']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
