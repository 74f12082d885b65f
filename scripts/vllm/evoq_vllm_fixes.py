"""Start-up fix for the vLLM venv on CPU machines, loaded in every interpreter by `evoq_vllm_fixes.pth`.

The only torchvision build for torch 2.13 is a CUDA build whose C extension cannot load here, and its
Python part then fails at import with `operator torchvision::nms does not exist`. transformers needs
torchvision for the Qwen2.5-VL processor (it always builds a video processor). Registering the two
missing op schemas before torchvision is imported makes its pure-Python transforms work. The hook waits
for `import torchvision` so interpreters that never touch it do not pay for importing torch.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries: list = []  # the Library objects must live as long as the process


def _register_torchvision_schemas() -> None:
    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        with contextlib.suppress(RuntimeError):  # defined by a build whose extension loads: keep it
            library.define(schema)
    _libraries.append(library)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the fix once, just before torchvision is first imported, then steps aside."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            _register_torchvision_schemas()
        return None


sys.meta_path.insert(0, _BeforeTorchvision())
