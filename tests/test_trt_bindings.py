"""export.trt's TensorRT names checked against the real TensorRT 10 and 11 Python bindings.

The bindings wheels (tensorrt-cu12-bindings) install from the package registry although the TensorRT
libraries they need do not, so the compiled module cannot be imported here; every name it binds is a
NUL-terminated string in it (the linker may share a name's bytes with the tail of a longer string)."""
from __future__ import annotations

import ast
import subprocess
import sys
import zipfile

import pytest

from export.trt import TENSORRT_API, TENSORRT_API_BY_MAJOR, tensorrt_api
from tests.helpers import REPO

WHEELS = REPO / ".cache" / "tensorrt-bindings"  # gitignored; filled with `pip download` on first use


def bindings_binary(major: int) -> bytes:
    """The compiled tensorrt module of the newest tensorrt-cu12-bindings of `major` (downloaded once)."""
    folder = WHEELS / str(major)
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                               "-d", str(folder), f"tensorrt-cu12-bindings>={major},<{major + 1}"],
                              capture_output=True, text=True, timeout=300)
        wheels = sorted(folder.glob("*.whl"))
        if proc.returncode or not wheels:
            pytest.skip(f"tensorrt-cu12-bindings {major}.x could not be downloaded: "
                        f"{(proc.stderr.strip().splitlines() or ['no wheel'])[-1]}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        name = next(n for n in wheel.namelist() if n.startswith("tensorrt_bindings/tensorrt") and n.endswith(".so"))
        return wheel.read(name)


def missing_names(binary: bytes, dotted: tuple[str, ...]) -> list[str]:
    return [name for name in dotted if any(part.encode() + b"\0" not in binary for part in name.split("."))]


@pytest.mark.parametrize("major", sorted(TENSORRT_API_BY_MAJOR))
def test_every_tensorrt_name_we_use_exists_in_the_bindings(major):
    binary = bindings_binary(major)
    assert missing_names(binary, tensorrt_api(major)) == []
    for other, names in TENSORRT_API_BY_MAJOR.items():  # the per-major names really differ (FP16 flag gone in 11)
        if other != major and names:
            assert missing_names(binary, names) == list(names), (other, names)


def test_the_name_list_covers_every_trt_attribute_the_code_reads():
    """Every `trt.X` / `trt.X.Y` chain in export/trt.py is in TENSORRT_API (or a per-major list)."""
    listed = set(TENSORRT_API).union(*TENSORRT_API_BY_MAJOR.values())
    used = set()

    class Chains(ast.NodeVisitor):
        def visit_Attribute(self, node):  # the outermost attribute of a chain; inner ones are its prefixes
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "trt":
                used.add(".".join(chain))
            else:
                self.generic_visit(node)
    Chains().visit(ast.parse((REPO / "export" / "trt.py").read_text()))
    assert used and used <= listed, used - listed
