"""``cli.py ensemble-eval`` loader for MindSpore members (run.json ``"backend": "mindspore"``).

The member is rebuilt from run.json (``train.mindspore.models.model_from_run``), final.ckpt is
loaded into it and its EBV basis checked against the run folder's file, as the torch loader does.
It runs in PYNATIVE mode (no graph compilation for the last, shorter batch) on the MindSpore device
named by ``SUBSPECTRAL_MS_DEVICE_TARGET`` (default CPU); logits come back as float32 torch tensors
on the ensemble's device, so MindSpore and torch members fuse in one ensemble.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from subspectral.schemas import ContractError, RunRecord
from subspectral.train.ensemble.members import FinishedRun, MemberError
from subspectral.train.run import CheckpointError


class MindSporeMember:
    def __init__(self, shard: int, meta: dict[str, Any], network: Any, device: torch.device) -> None:
        self.shard = shard
        self.meta = meta
        self.network = network
        self.device = device

    def predict(self, images: np.ndarray) -> torch.Tensor:
        from mindspore import Tensor

        batch = np.asarray(images)
        if batch.shape[1] == 3 and batch.shape[-1] != 3:  # NCHW -> NHWC, the layout the network takes
            batch = batch.transpose(0, 2, 3, 1)
        logits = self.network(Tensor(np.ascontiguousarray(batch))).asnumpy()
        return torch.from_numpy(logits.astype(np.float32)).to(self.device)


def load_mindspore_member(run: FinishedRun, device: torch.device) -> MindSporeMember:
    from subspectral.train.mindspore import MindSporeMissing, require_mindspore

    try:
        require_mindspore()
    except MindSporeMissing as error:
        raise MemberError(f"{run.path}: {error}") from error
    from subspectral.train.mindspore.runtime import prepare_environment

    target = os.environ.get("SUBSPECTRAL_MS_DEVICE_TARGET", "CPU")
    prepare_environment(target)
    import mindspore as ms
    from subspectral.train.mindspore.checkpoint import load_into, read_ckpt, verify_basis
    from subspectral.train.mindspore.models import ebv_basis_of, model_from_run

    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ms.set_device(target)
    except RuntimeError as error:  # the runtime already runs (an earlier member): only the same device will do
        if ms.get_context("device_target") != target:
            raise MemberError(f"{run.path}: MindSpore already runs on {ms.get_context('device_target')}, "
                              f"not {target}") from error
    path = run.path / "final.ckpt"
    try:
        params, meta = read_ckpt(path)
        record = RunRecord.from_json(meta, f"{path}'s run record")
        network = model_from_run(record.model, record.num_classes)
        load_into(network, params, path)
        verify_basis(run.path, ebv_basis_of(network))
    except (CheckpointError, ContractError) as error:
        raise MemberError(str(error)) from error
    network.set_train(False)
    return MindSporeMember(run.shard, meta, network, device)
