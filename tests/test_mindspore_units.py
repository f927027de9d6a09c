"""MindSpore backend pieces in-process: EBV basis, architectures, data batches, precision, checkpoints, loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mindspore")

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from subspectral.train.config import ConfigError, DataConfig, Recipe, TrainConfig  # noqa: E402
from subspectral.train.data import make_loader  # noqa: E402
from subspectral.train.mindspore.checkpoint import read_ckpt, save_ckpt  # noqa: E402
from subspectral.train.mindspore.data import train_dataset  # noqa: E402
from subspectral.train.mindspore.ebv import generate_basis  # noqa: E402
from subspectral.train.mindspore.models import ARCHS, count_parameters, create_model, ebv_basis_of  # noqa: E402
from subspectral.train.mindspore.step import learning_rates, precision_for  # noqa: E402
from subspectral.train.prepared import read_card, shard_uris  # noqa: E402
from subspectral.train.stream import TrainStream  # noqa: E402

ms.set_context(mode=ms.PYNATIVE_MODE)


def test_ebv_basis_equals_the_torch_backends():
    from subspectral.train.trainer import build_member_model

    spec = {"name": "resnet18", "stem": "imagenet", "head": "ebv", "ebv_dim": 8, "ebv_tau": 0.07, "ebv_seed": 7,
            "ebv_threshold": 0.002, "input": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}}
    recipe = Recipe()
    recipe.model.ebv_steps = 300
    torch_model = build_member_model({"num_classes": 12, "model": spec}, recipe, torch.device("cpu"), None)
    torch_basis = torch_model.net.fc.basis.numpy()
    basis = generate_basis(12, 8, 0.002, 7, 300)
    network = create_model("resnet18", 12, stem="imagenet", head="ebv", ebv_basis=basis)
    assert np.array_equal(ebv_basis_of(network), torch_basis)  # bit for bit
    assert not np.array_equal(generate_basis(12, 8, 0.002, 8, 300), torch_basis)  # the seed matters


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("stem", ["imagenet", "lowres"])
def test_architectures_match_torchvision_parameter_counts(name, stem):
    from subspectral.train.models import create_model as torch_model

    expected = sum(p.numel() for p in torch_model(name, 1000, stem=stem).parameters())
    assert count_parameters(create_model(name, 1000, stem=stem)) == expected


def test_forward_takes_stored_uint8_batches_at_56_and_28():
    network = create_model("resnet18", 10, stem="imagenet")
    network.set_train(False)
    for size in (56, 28):
        batch = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        assert network(ms.Tensor(batch)).shape == (2, 10)


def _stream(cls, data: Path, workers_seed: int = 3):
    card = read_card(str(data))
    config = DataConfig(batch_size=20, shuffle_buffer=50)
    return cls(shard_uris(str(data), card, 4, "train"), card, config, batch_size=20, batches_per_epoch=6,
               rank=0, world=1, seed=workers_seed)


def test_batches_equal_the_torch_loaders_in_order(prepared_sample):
    """Same partition, shuffle and augmentation as train.data, with 2 parallel workers on both sides."""
    torch_stream, ms_stream = _stream(TrainStream, prepared_sample), _stream(TrainStream, prepared_sample)
    torch_stream.set_epoch(1)
    ms_stream.set_epoch(1)
    expected = [(b["images"].numpy(), b["labels"].numpy()) for b in make_loader(torch_stream, 2, False)]
    got = list(train_dataset(ms_stream, 2).create_tuple_iterator(output_numpy=True, num_epochs=1))
    assert len(got) == len(expected) == 6
    for (images, labels, skipped), (want_images, want_labels) in zip(got, expected, strict=True):
        assert np.array_equal(images, want_images) and np.array_equal(labels, want_labels) and skipped == 0
    ms_stream.set_epoch(2)
    other_epoch = next(train_dataset(ms_stream, 2).create_tuple_iterator(output_numpy=True, num_epochs=1))
    assert not np.array_equal(other_epoch[0], got[0][0])


def test_amp_follows_the_recipe_and_is_off_on_cpu():
    assert precision_for(TrainConfig(amp="auto"), "CPU").amp_level == "O0"
    assert precision_for(TrainConfig(amp="auto"), "Ascend").amp_level == "O2"
    with pytest.raises(ConfigError, match="no mixed precision on the CPU"):
        precision_for(TrainConfig(amp=True), "CPU")
    fp16 = precision_for(TrainConfig(amp=True, amp_dtype="float16"), "Ascend")
    assert (fp16.amp_level, fp16.dtype, fp16.loss_scaling) == ("O2", "float16", True)
    bf16 = precision_for(TrainConfig(amp=True, amp_dtype="bfloat16"), "GPU")
    assert (bf16.dtype, bf16.loss_scaling) == ("bfloat16", False)
    assert precision_for(TrainConfig(amp=False), "Ascend").amp_level == "O0"


def test_learning_rates_follow_the_torch_schedule():
    from subspectral.train.engine import build_scheduler

    recipe = Recipe()
    recipe.schedule.epochs, recipe.schedule.warmup_epochs, recipe.optimizer.lr = 4, 1, 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, recipe, 5)
    expected = []
    for _ in range(20):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert np.allclose(learning_rates(recipe, 5), expected)


def test_checkpoint_is_atomic_and_refuses_another_member(tmp_path):
    network = create_model("resnet18", 10, stem="imagenet")
    meta = {"shard": 3, "model": {"name": "resnet18"}, "num_classes": 10}
    path = tmp_path / "last.ckpt"
    save_ckpt(network, path, meta, standalone=True, epoch=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left
    params, saved = read_ckpt(path, meta)
    assert saved == meta and "net.conv1.weight" in params and float(params["epoch"].asnumpy()) == 4
    from subspectral.train.run import CheckpointError

    with pytest.raises(CheckpointError, match="shard is 3 there, 4 here"):
        read_ckpt(path, {**meta, "shard": 4})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_ckpt(path)


def test_missing_mindspore_is_one_clear_line(monkeypatch):
    import importlib.util

    from subspectral.train.mindspore import MindSporeMissing, require_mindspore

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mindspore" else real(name, *a))
    with pytest.raises(MindSporeMissing) as error:
        require_mindspore()
    assert "pip install '.[mindspore]'" in str(error.value) and "\n" not in str(error.value)


def test_member_loader_predicts_what_the_network_computes(tmp_path):
    from ensemble_fixtures import make_dataset, make_run
    from subspectral.train.ensemble.members import load_member, read_run
    from subspectral.train.mindspore.checkpoint import save_basis

    basis = generate_basis(5, 5, 0.002, 42, 200)
    network = create_model("resnet18", 5, stem="imagenet", head="ebv", ebv_basis=basis)
    network.set_train(False)
    spec = {"name": "resnet18", "stem": "imagenet", "head": "ebv", "ebv_dim": 5, "ebv_tau": 0.07, "ebv_seed": 42,
            "ebv_threshold": 0.002, "input": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}}
    card = make_dataset(tmp_path / "data", np.zeros((1, 2, 16, 16, 3), np.uint8), [0, 1], num_classes=5)
    run_dir = make_run(tmp_path / "runs", card, 0, 50.0, backend="mindspore", data=str(tmp_path / "data"),
                       model=spec)
    meta = json.loads((run_dir / "run.json").read_text())
    save_ckpt(network, run_dir / "final.ckpt", meta, standalone=True)
    save_basis(run_dir, basis)
    member = load_member(read_run(run_dir), torch.device("cpu"))
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    logits = member.predict(images)
    assert logits.dtype == torch.float32 and logits.shape == (3, 5)
    assert np.allclose(logits.numpy(), network(ms.Tensor(images)).asnumpy(), atol=1e-5)
    assert torch.equal(member.predict(images.transpose(0, 3, 1, 2)), logits)
    save_basis(run_dir, np.eye(5, dtype=np.float32))
    from subspectral.train.ensemble.members import MemberError

    with pytest.raises(MemberError, match="EBV basis in the weights differs"):
        load_member(read_run(run_dir), torch.device("cpu"))


@pytest.mark.parametrize(("name", "stem", "head", "tags"), [
    ("resnet18", "lowres", "linear", ["open", "lowres stem", "input", "logits"]),
    ("resnet18", "imagenet", "ebv", ["open", "input", "ebv"]),
    ("resnet50", "lowres", "linear", ["open", "lowres stem", "input", "logits"]),  # bottleneck blocks' names
])
def test_final_safetensors_loads_into_torchvision_with_the_same_logits(tmp_path, name, stem, head, tags):
    """A MindSpore member's final.safetensors, loaded as docs/training.md shows, computes what MindSpore computes."""
    from subspectral.train.mindspore.checkpoint import save_portable
    from subspectral.train.mindspore.models import ebv_heads
    from test_portable_checkpoint import DOC_PATH, doc_block

    rng = np.random.default_rng(0)
    basis = generate_basis(10, 6, 0.002, 42, 200) if head == "ebv" else None
    network = create_model(name, 10, stem=stem, head=head, ebv_basis=basis, mean=(0.4, 0.5, 0.6),
                           std=(0.2, 0.25, 0.3))
    for param_name, param in network.parameters_and_names():  # BatchNorm statistics that are not the defaults
        if param_name.endswith(("moving_mean", "moving_variance")):
            low = 0.5 if param_name.endswith("variance") else -0.2
            param.set_data(ms.Tensor(rng.uniform(low, low + 0.7, param.shape).astype(np.float32)))
    network.set_train(False)
    meta = {"model": {"input": {"scale": 1 / 255, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]},
                      "ebv_tau": 0.07}, "num_classes": 10}
    save_portable(tmp_path / "final.safetensors", network.net, ebv_heads(network.net), meta)
    images = rng.integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    namespace = {"images": images}
    for tag in tags:
        code = doc_block(tag).replace(DOC_PATH, str(tmp_path / "final.safetensors"))
        exec(code.replace("torchvision.models.resnet18", f"torchvision.models.{name}"), namespace)  # noqa: S102
    expected = network(ms.Tensor(images)).asnumpy()
    assert np.allclose(namespace["logits"].detach().numpy(), expected, rtol=1e-3, atol=1e-3)
