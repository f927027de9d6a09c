"""final.safetensors in any tool: the code blocks of docs/training.md ("Using a member outside subspectral"),
run exactly as written, load it into plain torchvision models and give the member's own logits."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from subspectral.train.checkpoint import save_basis, save_portable
from subspectral.train.models import create_model

DOCS = REPO / "docs" / "training.md"
DOC_PATH = "runs/sub-07/final.safetensors"


def doc_block(tag: str) -> str:
    """The python block of docs/training.md whose first line is ``# [portable: TAG]``."""
    blocks = re.findall(r"```python\n(# \[portable: ([^\]]+)\]\n.*?)```", DOCS.read_text(), flags=re.DOTALL)
    found = [code for code, name in blocks if name == tag]
    assert len(found) == 1, f"docs/training.md has {len(found)} blocks tagged {tag!r}"
    return found[0]


def _member(tmp_path, *, stem: str, head: str):
    """A member with non-trivial weights and BatchNorm statistics, written as the trainer writes final weights."""
    torch.manual_seed(0)
    model = create_model("resnet18", 10, stem=stem, head=head, ebv_dim=6 if head == "ebv" else None,
                         ebv_steps=200, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    run = {"model": {"input": {"scale": 1 / 255, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]},
                     "ebv_tau": 0.07}, "num_classes": 10, "shard": 7}
    save_portable(tmp_path / "final.safetensors", model, run)
    save_basis(tmp_path, model)
    return model, run


def _run_docs(tags: list[str], tmp_path, images: np.ndarray) -> dict:
    namespace = {"images": images}
    for tag in tags:
        exec(doc_block(tag).replace(DOC_PATH, str(tmp_path / "final.safetensors")), namespace)  # noqa: S102
    return namespace


@pytest.mark.parametrize(("stem", "head", "tags"), [
    ("imagenet", "linear", ["open", "imagenet stem", "input", "logits"]),
    ("lowres", "linear", ["open", "lowres stem", "input", "logits"]),
    ("imagenet", "ebv", ["open", "input", "ebv"]),
])
def test_documented_loading_gives_the_members_logits(tmp_path, stem, head, tags):
    model, run = _member(tmp_path, stem=stem, head=head)
    images = np.random.default_rng(1).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    namespace = _run_docs(tags, tmp_path, images)
    assert namespace["run"] == run
    with torch.no_grad():
        expected = model(torch.from_numpy(images))
        torch.testing.assert_close(namespace["logits"].detach(), expected, rtol=1e-4, atol=1e-4)
    assert type(namespace["net"]).__module__ == "torchvision.models.resnet"  # a plain torchvision model


def test_the_ebv_basis_stays_with_the_weights(tmp_path):
    _member(tmp_path, stem="lowres", head="ebv")
    tensors = load_file(tmp_path / "final.safetensors")
    assert torch.equal(tensors["ebv_basis"], load_file(tmp_path / "ebv_basis.safetensors")["basis"])
    assert tensors["fc.weight"].shape == (6, 512) and "fc.proj.weight" not in tensors


def test_the_lowres_stem_needs_the_documented_change(tmp_path):
    _member(tmp_path, stem="lowres", head="linear")
    with pytest.raises(RuntimeError, match="conv1.weight"):
        _run_docs(["open", "imagenet stem"], tmp_path, np.zeros((1, 56, 56, 3), np.uint8))
    assert json.loads(json.dumps(_run_docs(["open"], tmp_path, np.zeros(0))["run"]))["shard"] == 7
