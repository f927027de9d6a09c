"""MindSpore backend of ``cli.py train`` (``--backend mindspore``): the same recipes, data and run layout.

``cli`` (the command's entry), ``runtime`` (context, device target, mode, msrun/mpirun), ``models``
(ResNet family, stems, EBV head, input normalisation; same registry names as ``train.models``),
``ebv`` (the torch backend's basis), ``data`` (GeneratorDataset over the WebDataset shards, same
partition/shuffle/augmentation as ``train.data``), ``step`` (loss, optimizer, lr per step, AMP level,
loss scaling, the compiled train step), ``checkpoint`` (atomic .ckpt files), ``trainer`` (one
member), ``member`` (the ensemble-eval loader). See docs/mindspore.md.

Nothing here imports MindSpore at package import time: ``require_mindspore`` gives the one-line
message when it is missing.
"""

from __future__ import annotations

import importlib.util

MISSING_MESSAGE = ("--backend mindspore needs MindSpore, which is not installed: "
                   "pip install '.[mindspore]' (mindspore==2.10.0, numpy<2)")


class MindSporeMissing(RuntimeError):
    """MindSpore is not importable; the message is one line for the user."""


def require_mindspore() -> None:
    if importlib.util.find_spec("mindspore") is None:
        raise MindSporeMissing(MISSING_MESSAGE)
