"""Model registry: torchvision parameter counts, stems, heads, input normalisation, rebuild from run.json."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from subspectral.schemas import InputConstants, ModelSpec
from subspectral.train.models import MODEL_BUILDERS, create_model, ebv_basis_of, model_from_run


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_parameter_counts_equal_torchvision(name):
    ours = create_model(name, 1000, stem="imagenet", head="linear")
    assert _params(ours) == _params(getattr(tvm, name)(weights=None))


def test_resnext50_has_the_published_count():
    assert _params(create_model("resnext50_32x4d", 1000, stem="imagenet")) == 25_028_904


@pytest.mark.parametrize("name, stem", [(n, s) for n in sorted(MODEL_BUILDERS) for s in ("imagenet", "lowres")
                                        if (n, s) != ("alexnet", "imagenet")])
def test_every_model_and_stem_takes_56x56_uint8(name, stem):
    model = create_model(name, 7, stem=stem).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 56, 56, 3), dtype=torch.uint8))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_alexnet_imagenet_stem_is_too_coarse_for_56x56():
    with pytest.raises(RuntimeError):
        create_model("alexnet", 7, stem="imagenet").eval()(torch.zeros(1, 56, 56, 3, dtype=torch.uint8))


def test_lowres_stem_keeps_full_resolution_features():
    net = create_model("resnet18", 10, stem="lowres").net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    stem = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool).eval()
    assert stem(torch.zeros(1, 3, 56, 56)).shape[-2:] == (56, 56)


def test_input_norm_maps_uint8_to_the_recipe_range():
    model = create_model("resnet18", 10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batch = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    batch[..., 0] = 255
    x = model.input_norm(batch)
    assert x.shape == (1, 3, 4, 4)
    assert torch.allclose(x[:, 0], torch.ones(1, 4, 4)) and torch.allclose(x[:, 1:], -torch.ones(1, 2, 4, 4))


def test_ebv_model_rebuilds_from_run_json_with_identical_outputs():
    spec = ModelSpec(name="resnet18", stem="imagenet", head="ebv", ebv_dim=16, ebv_tau=0.07, ebv_seed=3,
                     ebv_threshold=0.002, input=InputConstants(1 / 255, (0.5,) * 3, (0.5,) * 3))
    trained = create_model("resnet18", 10, stem="imagenet", head="ebv", ebv_dim=16, ebv_seed=3).eval()
    rebuilt = model_from_run(spec, 10)
    rebuilt.load_state_dict(trained.state_dict())
    assert torch.equal(ebv_basis_of(rebuilt), ebv_basis_of(trained))
    batch = torch.randint(0, 256, (2, 56, 56, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(batch), trained(batch))
    assert trained.state_dict()["net.fc.basis"].shape == (10, 16)
