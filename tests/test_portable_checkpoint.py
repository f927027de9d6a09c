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
from subspectral.train.models import MODEL_BUILDERS, create_model

DOCS = REPO / "docs" / "training.md"
DOC_PATH = "runs/sub-07/final.safetensors"


def doc_block(tag: str) -> str:
    """The python block of docs/training.md whose first line is ``# [portable: TAG]``."""
    blocks = re.findall(r"```python\n(# \[portable: ([^\]]+)\]\n.*?)```", DOCS.read_text(), flags=re.DOTALL)
    found = [code for code, name in blocks if name == tag]
    assert len(found) == 1, f"docs/training.md has {len(found)} blocks tagged {tag!r}"
    return found[0]


def _member(tmp_path, *, stem: str, head: str, name: str = "resnet18"):
    """A member with non-trivial weights and BatchNorm statistics, written as the trainer writes final weights."""
    torch.manual_seed(0)
    model = create_model(name, 10, stem=stem, head=head, ebv_dim=6 if head == "ebv" else None,
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


# The lowres block of each family in docs/training.md; the ResNet block serves every ResNet and ResNeXt.
LOWRES_BLOCKS = {"alexnet": "lowres stem alexnet", "vgg16": "lowres stem vgg16"}


# One model of each builder family (resnet18 is the test above; the deeper ResNets differ only in depth).
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "alexnet", "vgg16"])
def test_each_model_family_loads_into_its_torchvision_model_as_documented(tmp_path, name):
    """The imagenet stem loads strictly into torchvision.models.<name>, and the lowres stem after its
    documented change, computing the member's logits."""
    assert name in MODEL_BUILDERS
    lowres = LOWRES_BLOCKS.get(name, "lowres stem")
    for stem, tags in (("imagenet", ["open", "imagenet stem"]), ("lowres", ["open", lowres, "input", "logits"])):
        model, _ = _member(tmp_path, stem=stem, head="linear", name=name)
        images = np.random.default_rng(1).integers(0, 256, (1, 56, 56, 3), dtype=np.uint8)
        namespace = {"images": images}
        for tag in tags:
            code = doc_block(tag).replace(DOC_PATH, str(tmp_path / "final.safetensors"))
            if tag in ("imagenet stem", "lowres stem"):  # written for resnet18: "run['model']['name'] names it"
                code = code.replace("torchvision.models.resnet18", f"torchvision.models.{name}")
            exec(code, namespace)  # noqa: S102
        assert type(namespace["net"]) is type(model.net)  # torchvision's own class, built by the docs' code
        if stem == "lowres":
            with torch.no_grad():
                expected = model(torch.from_numpy(images))
            torch.testing.assert_close(namespace["logits"].detach(), expected, rtol=1e-4, atol=1e-4)


def test_a_channels_last_member_writes_the_same_file(tmp_path):
    """On CUDA the trainer keeps the model channels_last (train.channels_last): its 4-d weights are not contiguous,
    which safetensors refuses; the file holds the same tensors as from a contiguous model."""
    model, run = _member(tmp_path, stem="lowres", head="linear")
    plain = load_file(tmp_path / "final.safetensors")
    model.to(memory_format=torch.channels_last)
    assert not model.net.conv1.weight.is_contiguous()
    save_portable(tmp_path / "final.safetensors", model, run)
    tensors = load_file(tmp_path / "final.safetensors")
    assert tensors.keys() == plain.keys() and all(torch.equal(tensors[key], plain[key]) for key in plain)
