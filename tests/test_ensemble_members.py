"""Member discovery and the torch loader (train/members.py) on run folders in the trainer's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ensemble_fixtures import make_dataset, make_run, make_torch_run
from subspectral.schemas import DatasetCard
from subspectral.train.checkpoint import load_trained_model
from subspectral.train.ensemble.members import MemberError, check_compatible, discover_runs, load_member, read_run

SIZE = 16


@pytest.fixture()
def card(tmp_path: Path) -> dict:
    images = np.zeros((4, 2, SIZE, SIZE, 3), dtype=np.uint8)
    return make_dataset(tmp_path / "data", images, [0, 1], num_classes=5)


def test_discovery_lists_finished_and_missing_members(tmp_path: Path, card: dict) -> None:
    runs = tmp_path / "runs"
    make_run(runs, card, 0, 50.0, backend="torch", data="d")
    make_run(runs, card, 2, 60.0, backend="torch", data="d")
    (runs / "sub-03").mkdir()  # started, not finished: no final.json
    (runs / "sub-03" / "run.json").write_text("{}")
    found, missing = discover_runs(runs, card["sub_datasets"], [0, 1, 2, 3])
    assert [(r.shard, r.val_top1) for r in found] == [(0, 50.0), (2, 60.0)]
    assert missing == [1, 3]


def test_run_folder_for_another_shard_is_refused(tmp_path: Path, card: dict) -> None:
    path = make_run(tmp_path, card, 1, 50.0, backend="torch", data="d")
    with pytest.raises(MemberError, match="run.json says shard 1"):
        read_run(path, shard=2)


@pytest.mark.parametrize(
    ("field", "value"), [("split", 16), ("transform", "dct"), ("size", 112), ("num_classes", 9)]
)
def test_member_of_other_data_is_refused(tmp_path: Path, card: dict, field: str, value) -> None:
    run = read_run(make_run(tmp_path, card, 0, 50.0, backend="torch", data="d", **{field: value}))
    with pytest.raises(MemberError, match=f"trained with {field}={value!r}"):
        check_compatible(run, DatasetCard.from_json(card), "DATA")


def test_unknown_backend_names_the_known_ones(tmp_path: Path, card: dict) -> None:
    run = read_run(make_run(tmp_path, card, 0, 50.0, backend="jax", data="d"))
    with pytest.raises(MemberError, match=r"no loader for backend 'jax' \(known: .*torch"):
        load_member(run, torch.device("cpu"))


@pytest.mark.parametrize("head", ["linear", "ebv"])
def test_torch_member_predicts_what_the_trained_network_computes(tmp_path: Path, card: dict, head: str):
    path = make_torch_run(tmp_path, card, 0, 50.0, data="d", head=head)
    member = load_member(read_run(path), torch.device("cpu"))
    network, _ = load_trained_model(path)
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    logits = member.predict(images)
    assert logits.shape == (3, 5) and logits.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(logits, network(torch.from_numpy(images)))
    torch.testing.assert_close(member.predict(images.transpose(0, 3, 1, 2)), logits)
    assert member.shard == 0 and member.meta["model"]["head"] == head


def test_truncated_checkpoint_is_one_clear_error(tmp_path: Path, card: dict) -> None:
    path = make_torch_run(tmp_path, card, 0, 50.0, data="d")
    checkpoint = path / "final.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(MemberError, match="final.pt: corrupt or unusable checkpoint"):
        load_member(read_run(path), torch.device("cpu"))


def test_ebv_basis_that_differs_from_the_run_file_is_refused(tmp_path: Path, card: dict) -> None:
    from safetensors.torch import save_file

    path = make_torch_run(tmp_path, card, 0, 50.0, data="d", head="ebv")
    save_file({"basis": torch.eye(5)}, path / "ebv_basis.safetensors")
    with pytest.raises(MemberError, match="EBV basis"):
        load_member(read_run(path), torch.device("cpu"))


def test_mindspore_backend_is_routed_to_its_loader(tmp_path: Path, card: dict) -> None:
    # No final.ckpt here (and possibly no MindSpore installed): either way the MindSpore loader itself
    # answers with one clear MemberError, not the registry's "no loader".
    run = read_run(make_run(tmp_path, card, 0, 50.0, backend="mindspore", data="d"))
    with pytest.raises(MemberError) as error:
        load_member(run, torch.device("cpu"))
    assert "no loader" not in str(error.value) and "\n" not in str(error.value)
