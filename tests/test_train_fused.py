"""Fused training (``cli.py train --fuse K``): K members as one grouped network equal the K members alone.

Units: the grouped network against its members (float64, every layer kind), the member tensors as views of
their blocks, the lockstep stream against each member's own stream, misaligned sub-datasets, one member's
overflowing step skipped alone. In process, float64: the fused epoch against each member's solo epoch with
every per-member feature on (AdamW, EMA, gradient clipping, GradScaler, mixup/cutmix, accumulation).
End to end (float32, deterministic): 4 members fused against the same 4 alone, ensemble-eval of both, and a
fused run killed with SIGKILL and resumed (one member behind the others) against the uninterrupted run.

Exactness is shown in float64 (agreement to ~1e-13 after 6 steps). In float32 these small networks on the
sample's flat-coloured images are chaotic: after one step fused and solo updates differ by ~1e-5 (relative
norm), but a step or two later a member may jump to 1e-3 .. 1e-2, and after 10 steps it is 0.04 .. 0.5 --
as much as two solo runs that differ only in the number of CPU threads (0.36 .. 0.45, SGD lr 0.002, measured
here). The float32 runs therefore take two steps (one per epoch) and allow 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fails_with_one_line, kill_when_written, run_cli
from ensemble_fixtures import write_shard
from subspectral.pipeline.sample import sample_corpus
from subspectral.train.config import DataConfig, apply_overrides, load_recipe
from subspectral.train.data import make_loader
from subspectral.train.distributed import DistInfo
from subspectral.train.engine import train_one_epoch
from subspectral.train.fused import fuse_members, own_storage
from subspectral.train.fused_data import FusedEvalStream, FusedTrainStream, aligned_piece_samples, decode_aligned
from subspectral.train.fused_trainer import GroupMember, train_fused_epoch
from subspectral.train.models import create_model
from subspectral.train.prepared import read_card, shard_uris
from subspectral.train.run import MemberJob
from subspectral.train.storage import DataError
from subspectral.train.stream import EvalStream, TrainStream
from subspectral.train.trainer import MemberTrainer

MEMBERS = 4


@pytest.fixture(scope="module")
def small4(tmp_path_factory) -> Path:
    """The embedded sample with 12 images per class, split 4: 100 train (shards of 32) and 20 val per member."""
    corpus = sample_corpus(tmp_path_factory.mktemp("fused-corpus"), per_class=12)
    out = tmp_path_factory.mktemp("fused-sample") / "data"
    run_cli("prepare", "--src", str(corpus), "--out", str(out), "--split", "4", "--val-per-class", "2",
            "--shard-size", "32", "--executor", "serial")
    return out


# --- the grouped network -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, stem, head, size", [
    ("resnet18", "imagenet", "linear", 56),
    ("resnext50_32x4d", "imagenet", "ebv", 32),  # grouped convolutions inside, and the EBV head
    ("alexnet", "lowres", "linear", 32),  # dropout and a stack of linear layers
])
def test_grouped_network_computes_each_member(name, stem, head, size):
    members = []
    for k in range(3):
        torch.manual_seed(k)
        members.append(create_model(name, 7, stem=stem, head=head, ebv_dim=5 if head == "ebv" else None,
                                    ebv_steps=20).double().train())
    fused = fuse_members(members).double().train()
    inputs = torch.randn(4, 3 * len(members), size, size, dtype=torch.float64)
    torch.manual_seed(9)  # dropout: the fused network draws the mask each member would draw from this seed
    out = fused.net(inputs).view(4, len(members), 7)
    out.transpose(0, 1).flatten(0, 1).logsumexp(dim=1).sum().backward()
    for k, member in enumerate(members):
        torch.manual_seed(9)
        own = member.net(inputs[:, 3 * k:3 * k + 3])
        own.logsumexp(dim=1).sum().backward()
        torch.testing.assert_close(out[:, k], own, rtol=1e-10, atol=1e-10)
        fused_grads = dict(fused.net.named_parameters())
        for pname, param in member.net.named_parameters():
            block = fused_grads[pname].grad.view(len(members), *param.shape)[k]
            torch.testing.assert_close(block, param.grad, rtol=1e-9, atol=1e-10, msg=pname)
        fused_state = fused.net.state_dict()
        for bname, buffer in member.net.named_buffers():  # BatchNorm statistics of the same batch
            if buffer.ndim:
                torch.testing.assert_close(fused_state[bname].view(len(members), *buffer.shape)[k], buffer)


def test_fused_input_norm_keeps_each_members_constants():
    members = [create_model("resnet18", 5, input_scale=1 / (255 * 6 * 0.5 * (k + 1)), mean=[0.5 * (k == 0)] * 3,
                            std=[0.25 + k, 0.5, 1.0]) for k in range(3)]
    batch = torch.randint(-300, 300, (2, 8, 8, 9), dtype=torch.int16)
    fused = fuse_members(members).input_norm(batch)
    for k, member in enumerate(members):
        assert torch.equal(fused[:, 3 * k:3 * k + 3], member.input_norm(batch[..., 3 * k:3 * k + 3]))


def test_shared_members_are_views_of_their_blocks(tmp_path):
    members = [create_model("resnet18", 10, stem="imagenet") for _ in range(3)]
    fused = fuse_members(members, share=True)
    conv = fused.net.conv1.weight
    with torch.no_grad():
        members[1].net.conv1.weight.add_(1.0)  # an optimizer stepping member 1 steps block 1
    assert torch.equal(conv[64:128], members[1].net.conv1.weight) and not torch.equal(conv[:64], conv[64:128])
    assert members[2].net.fc.weight.grad.data_ptr() == fused.net.fc.weight.grad[20:].data_ptr()
    fused.train()(torch.randint(0, 256, (4, 56, 56, 9), dtype=torch.uint8))  # BatchNorm statistics update
    assert torch.equal(members[0].net.bn1.running_mean, fused.net.bn1.running_mean[:64])
    assert int(members[2].net.bn1.num_batches_tracked) == 1
    # What a member saves is its own weights, not the K blocks around them.
    torch.save(own_storage(members[0].state_dict()), tmp_path / "own.pt")
    torch.save(create_model("resnet18", 10, stem="imagenet").state_dict(), tmp_path / "alone.pt")
    assert (tmp_path / "own.pt").stat().st_size < 1.01 * (tmp_path / "alone.pt").stat().st_size


def test_members_that_cannot_be_fused_are_refused():
    with pytest.raises(ValueError, match="members differ in architecture"):
        fuse_members([create_model("resnet18", 10), create_model("resnet18", 10, stem="imagenet")])
    odd = create_model("resnet18", 10)
    odd.net.layer1 = torch.nn.LayerNorm(64)
    with pytest.raises(ValueError, match="cannot fuse a LayerNorm layer"):
        fuse_members([odd, odd])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_an_overflowing_member_skips_its_own_step_only():
    """float16 loss scaling per member: member 1's inf/NaN gradients skip its step and halve its scale."""
    recipe = load_recipe("sample")
    members, solo = [], []
    for k in range(3):
        for group in (members, solo):
            torch.manual_seed(0)
            model = create_model("resnet18", 10, stem="imagenet")
            if k == 1:
                with torch.no_grad():
                    model.net.conv1.weight[0, 0, 0, 0] = float("nan")
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            group.append(_Member(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                                 torch.amp.GradScaler("cpu", init_scale=2.0**(8 + k))))
    ctx = _context(recipe, 10)
    batch = {"images": torch.randint(0, 256, (6, 56, 56, 9), dtype=torch.uint8), "labels": torch.arange(6) % 10,
             "skipped": torch.tensor(0)}
    before = [_flat(m.model) for m in members]
    net = fuse_members([m.model for m in members], share=True)
    train_fused_epoch(net, members, [batch], ctx, np.random.default_rng(0), _NoBar())
    for k, (member, alone) in enumerate(zip(members, solo, strict=True)):
        mine = {**batch, "images": batch["images"][..., 3 * k:3 * k + 3].contiguous()}
        train_one_epoch(alone.model, [mine], alone.optimizer, alone.scheduler, alone.scaler, ctx,
                        np.random.default_rng(0), lambda: None, lambda *_: None)
        assert member.scaler.get_scale() == alone.scaler.get_scale()
        if k == 1:
            assert member.scaler.get_scale() == 2.0**8  # not stepped: its weights are as they were
            torch.testing.assert_close(_flat(member.model), before[1], rtol=0, atol=0, equal_nan=True)
        else:
            assert member.scaler.get_scale() == 2.0**(8 + k)
            torch.testing.assert_close(_flat(member.model), _flat(alone.model), rtol=1e-5, atol=1e-6)


def test_fused_step_in_cuda_settings_bf16_channels_last_compiled():
    """The CUDA path's settings, run on the CPU: bf16 autocast, channels_last weights, torch.compile (aot_eager)."""
    from subspectral.train.config import TrainConfig
    from subspectral.train.engine import StepContext

    members, solo = [], []
    for group in (members, solo):
        for k in range(2):
            torch.manual_seed(k)
            model = create_model("resnet18", 10, stem="imagenet")
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            group.append(_Member(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                                 torch.amp.GradScaler("cpu", enabled=False)))
    ctx = StepContext(torch.device("cpu"), torch.bfloat16, 10, TrainConfig(amp=True))
    before = [_flat(m.model) for m in solo]
    net = fuse_members([m.model for m in members], share=True, memory_format=torch.channels_last)
    assert net.net.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert members[1].model.net.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = {"images": torch.randint(0, 256, (8, 56, 56, 6), dtype=torch.uint8), "labels": torch.arange(8) % 10,
             "skipped": torch.tensor(0)}
    compiled = torch.compile(net, backend="aot_eager")
    lines = train_fused_epoch(compiled, members, [batch, batch], ctx, np.random.default_rng(0), _NoBar())
    for k, (member, alone) in enumerate(zip(members, solo, strict=True)):
        mine = {**batch, "images": batch["images"][..., 3 * k:3 * k + 3].contiguous()}
        stats = train_one_epoch(alone.model, [mine, mine], alone.optimizer, alone.scheduler, alone.scaler, ctx,
                                np.random.default_rng(0), lambda: None, lambda *_: None)
        assert lines[k]["train_loss"] == pytest.approx(stats["train_loss"], rel=2e-2)  # bfloat16: 8 mantissa bits
        update, fused_update = _flat(alone.model) - before[k], _flat(member.model) - before[k]
        assert float((update - fused_update).norm() / update.norm()) < 0.1


class _Member:
    """What the fused step uses of a member trainer."""

    def __init__(self, model, optimizer, scheduler, scaler) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, None


class _NoBar:
    def step(self, *_: object) -> None:
        return None


def _context(recipe, classes: int):
    from subspectral.train.engine import StepContext

    return StepContext(torch.device("cpu"), None, classes, recipe.train)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


# --- the lockstep stream -------------------------------------------------------------------------------------

def test_fused_stream_gives_each_member_its_own_batches(small4):
    """Same shards, shuffle, crops and flips as each member's own stream (with a loader worker, too)."""
    card = read_card(str(small4))
    config = DataConfig(shuffle_buffer=50, crop="pad", hflip=True)
    uris = [shard_uris(str(small4), card, k, "train") for k in range(MEMBERS)]
    fused = FusedTrainStream(uris, card, config, batch_size=20, batches_per_epoch=5, rank=0, world=1, seed=3)
    for epoch in (0, 1):
        fused.set_epoch(epoch)
        together = list(make_loader(fused, 1, False))
        assert len(together) == 5 and together[0]["images"].shape == (20, 56, 56, 3 * MEMBERS)
        for k in range(MEMBERS):
            alone = TrainStream(uris[k], card, config, batch_size=20, batches_per_epoch=5, rank=0, world=1, seed=3)
            alone.set_epoch(epoch)
            for ours, theirs in zip(together, make_loader(alone, 0, False), strict=True):
                assert torch.equal(ours["images"][..., 3 * k:3 * k + 3], theirs["images"])
                assert torch.equal(ours["labels"], theirs["labels"])
    val = [shard_uris(str(small4), card, k, "val") for k in range(MEMBERS)]
    fused_val = list(make_loader(FusedEvalStream(val, card, batch_size=8, rank=0, world=1), 0, False))
    alone_val = list(make_loader(EvalStream(val[2], card, batch_size=8, rank=0, world=1), 0, False))
    assert [len(b["labels"]) for b in fused_val] == [8, 8, 4]
    for ours, theirs in zip(fused_val, alone_val, strict=True):
        assert torch.equal(ours["images"][..., 6:9], theirs["images"])


def _encoded(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def test_misaligned_sub_datasets_stop_with_one_line(tmp_path):
    from subspectral.train.stream import Piece, StreamStats, piece_source

    def samples(*shards: Path) -> list[dict]:
        stats = StreamStats()
        urls = [tuple(str(s) for s in shards)]
        return list(aligned_piece_samples(piece_source(urls, [Piece(0, 0, 1)], stats=stats), stats=stats))

    keys = ["a", "b", "c"]
    write_shard(tmp_path / "0.tar", keys, [0, 1, 2], [_encoded(v) for v in range(3)])
    write_shard(tmp_path / "1.tar", ["a", "x", "c"], [0, 1, 2], [_encoded(v) for v in range(3)])
    write_shard(tmp_path / "2.tar", keys[:2], [0, 1], [_encoded(v) for v in range(2)])
    write_shard(tmp_path / "3.tar", keys, [0, 5, 2], [_encoded(v) for v in range(3)])
    assert [s["__key__"] for s in samples(tmp_path / "0.tar", tmp_path / "3.tar")] == keys
    with pytest.raises(DataError, match=r"misaligned sub-datasets: sample 1 of .*0.tar is key 'b', of .*1.tar key 'x'"):
        samples(tmp_path / "0.tar", tmp_path / "1.tar")
    with pytest.raises(DataError, match=r"sample 2 of .*0.tar is key 'c', of .*2.tar nothing"):
        samples(tmp_path / "0.tar", tmp_path / "2.tar")
    second = samples(tmp_path / "0.tar", tmp_path / "3.tar")[1]
    with pytest.raises(DataError, match=r"misaligned sub-datasets: sample 'b' has class 1 in .*0.tar but 5 in"):
        decode_aligned(np.empty((4, 4, 6), np.uint8), second, 10)


# --- the fused epoch against solo epochs, float64 ----------------------------------------------------------------

EVERYTHING = ["data.batch_size=10", "train.ema_decay=0.9", "train.grad_clip=0.5",
              "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.mix_prob=0.8", "train.label_smoothing=0.1",
              "train.accumulate_steps=2"]


def _trainers(cls, small4: Path, out: Path, recipe) -> list[MemberTrainer]:
    trainers = [cls(MemberJob(str(small4), k, out, False, False), recipe, DistInfo(), torch.device("cpu"))
                for k in range(MEMBERS)]
    for k, trainer in enumerate(trainers):
        trainer.build()
        trainer.model.double()
        trainer.ema.module.double()
        # Loss scaling per member, each with its own scale (float64 never overflows: every step is taken).
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**(4 * k))
    return trainers


def test_fused_epoch_equals_each_members_solo_epoch_in_float64(small4, tmp_path, monkeypatch):
    from subspectral.train.fused import FusedInputNorm
    from subspectral.train.models import InputNorm

    def to_buffer_dtype(self, batch):  # the float64 network takes float64 input
        return (batch.permute(0, 3, 1, 2).to(self.mean.dtype) * self.scale - self.mean) / self.std

    monkeypatch.setattr(InputNorm, "forward", to_buffer_dtype)
    monkeypatch.setattr(FusedInputNorm, "forward", to_buffer_dtype)
    recipe = apply_overrides(load_recipe("sample"), EVERYTHING)
    group = _trainers(GroupMember, small4, tmp_path / "group", recipe)
    solo = _trainers(MemberTrainer, small4, tmp_path / "solo", recipe)
    initial = [_flat(m.model) for m in solo]
    uris = [m.train_uris for m in group]
    stream = FusedTrainStream(uris, group[0].card, recipe.data, batch_size=10, batches_per_epoch=10, rank=0, world=1,
                              seed=0)
    batches = list(make_loader(stream, 0, False))[:6]
    net = fuse_members([m.model for m in group], share=True)
    lines = train_fused_epoch(net, group, batches, group[0].ctx, np.random.default_rng([0, 0, 0]), _NoBar())
    for k, (member, alone) in enumerate(zip(group, solo, strict=True)):
        own = [{**b, "images": b["images"][..., 3 * k:3 * k + 3].contiguous()} for b in batches]
        stats = train_one_epoch(alone.model, own, alone.optimizer, alone.scheduler, alone.scaler, alone.ctx,
                                np.random.default_rng([0, 0, 0]), lambda a=alone: a.ema.update_parameters(a.model),
                                lambda *_: None)
        assert lines[k]["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-6)  # float32 losses
        update, fused_update = _flat(alone.model) - initial[k], _flat(member.model) - initial[k]
        assert float((update - fused_update).norm() / update.norm()) < 1e-9
        ema, fused_ema = _flat(alone.ema.module), _flat(member.ema.module)
        assert float((ema - fused_ema).norm() / ema.norm()) < 1e-9
        assert member.scaler.get_scale() == alone.scaler.get_scale() == 2.0**(4 * k)
        state, fused_state = alone.optimizer.state_dict()["state"], member.optimizer.state_dict()["state"]
        torch.testing.assert_close(fused_state, state, rtol=1e-9, atol=1e-12)
        for name, buffer in alone.model.named_buffers():
            torch.testing.assert_close(dict(member.model.named_buffers())[name], buffer, rtol=1e-9, atol=1e-12)
    assert [line["steps"] for line in lines] == [6] * MEMBERS


# --- end to end: cli.py train --fuse, ensemble-eval, resume after SIGKILL ----------------------------------------

# Deterministic, float32, one step per epoch (100 train samples); EMA, per-member gradient clipping and
# mixing on; a loader worker in the fused run.
E2E = ("--config", "sample", "--no-progress", "schedule.epochs=2", "data.batch_size=100", "train.deterministic=true",
       "train.ema_decay=0.9", "train.grad_clip=1.0", "train.mixup_alpha=0.2", "train.mix_prob=0.5")
FLOAT32 = 1e-2  # relative difference of two updates allowed after two steps (see the module docstring)


@pytest.fixture(scope="module")
def trained(small4, tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("fused-runs")
    data = ("--data", str(small4), "--shard", f"0-{MEMBERS - 1}")
    run_cli("train", *data, "--out", str(runs / "solo"), *E2E)
    run_cli("train", *data, "--out", str(runs / "fused"), "--fuse", str(MEMBERS), *E2E, "data.workers=1")
    return {"solo": runs / "solo", "fused": runs / "fused", "data": small4}


def _weights(run_dir: Path, name: str = "final.pt") -> dict[str, torch.Tensor]:
    return torch.load(run_dir / name, weights_only=True)["model"]


def _update_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """|our update - their update| / |their update| over all parameters, from the common start."""
    torch.manual_seed(0)  # the trainer seeds 0, then builds: the same initial weights for every member
    initial = create_model("resnet18", 10, stem="imagenet").state_dict()
    names = [n for n, value in initial.items() if value.is_floating_point()]
    update = torch.cat([(theirs[n] - initial[n]).flatten() for n in names])
    difference = torch.cat([(ours[n] - theirs[n]).flatten() for n in names])
    return float(difference.norm() / update.norm())


def test_fused_members_equal_solo_members(trained):
    for k in range(MEMBERS):
        folder = f"sub-{k:02d}"
        solo, fused = trained["solo"] / folder, trained["fused"] / folder
        for name in ("last.pt", "final.pt"):
            ours, theirs = _weights(fused, name), _weights(solo, name)
            assert ours.keys() == theirs.keys()
            assert _update_difference(ours, theirs) < FLOAT32, (folder, name)
        assert json.loads((fused / "run.json").read_text()) == json.loads((solo / "run.json").read_text())
        assert sorted(p.name for p in fused.iterdir()) == sorted(p.name for p in solo.iterdir())
        lines = [json.loads(line) for line in (fused / "metrics.jsonl").read_text().splitlines()]
        assert [(line["epoch"], line["steps"], line["fused"]) for line in lines] == [(1, 1, 4), (2, 1, 4)]
        final = json.loads((fused / "final.json").read_text())
        assert final["ema"] is True and final["val_samples"] == 20


def test_ensemble_eval_reads_fused_members_as_solo_ones(trained, tmp_path):
    reports = {}
    for name, fuse in (("solo", "1"), ("fused", "1"), ("fused", "4")):
        out = tmp_path / f"{name}-{fuse}"
        run_cli("ensemble-eval", "--data", str(trained["data"]), "--runs", str(trained[name]), "--out", str(out),
                "--device", "cpu", "--fuse", fuse)
        reports[name, fuse] = json.loads((out / "report.json").read_text())
    one_by_one, together = reports["fused", "1"], reports["fused", "4"]
    assert [m["top1"] for m in one_by_one["members"]] == [m["top1"] for m in together["members"]]
    assert one_by_one["methods"] == together["methods"]
    for member in together["members"]:  # ensemble-eval measures each member as its trainer did
        final = json.loads((trained["fused"] / member["folder"] / "final.json").read_text())
        assert 100 * member["top1"] == pytest.approx(final["top1"], abs=1e-9)
    solo_top1 = {m["shard"]: m["top1"] for m in reports["solo", "1"]["members"]}
    for member in together["members"]:  # 20 val images: at most one prediction flips by rounding
        assert abs(member["top1"] - solo_top1[member["shard"]]) <= 0.05


def test_killed_fused_run_resumes_to_the_uninterrupted_weights(trained, tmp_path):
    data = ("--data", str(trained["data"]), "--shard", f"0-{MEMBERS - 1}", "--fuse", str(MEMBERS))
    killed = tmp_path / "killed"
    last = killed / f"sub-{MEMBERS - 1:02d}" / "last.pt"  # the group's last checkpoint of epoch 1
    kill_when_written(last, "train", *data, "--out", str(killed), *E2E, "data.workers=1")
    assert all(torch.load(killed / f"sub-{k:02d}" / "last.pt", weights_only=True)["epoch"] == 0
               for k in range(MEMBERS))
    # As if killed between two checkpoint writes of the group: member 3 has none, it catches up alone.
    behind = killed / f"sub-{MEMBERS - 1:02d}"
    last.unlink()
    (behind / "metrics.jsonl").unlink()

    run_cli("train", *data, "--out", str(killed), "--resume", *E2E, "data.workers=1")
    for k in range(MEMBERS):
        whole, resumed = _weights(trained["fused"] / f"sub-{k:02d}"), _weights(killed / f"sub-{k:02d}")
        assert whole.keys() == resumed.keys()
        if k < MEMBERS - 1:  # resumed from their checkpoints: bit for bit, whatever member 3 did beside them
            for name in whole:
                assert torch.equal(whole[name], resumed[name]), (k, name)
        else:  # epoch 1 trained alone: equal up to float32 rounding
            assert _update_difference(resumed, whole) < FLOAT32
        lines = [json.loads(line) for line in (killed / f"sub-{k:02d}" / "metrics.jsonl").read_text().splitlines()]
        assert [line["epoch"] for line in lines] == [1, 2]
        assert ("fused" in lines[0]) == (k < MEMBERS - 1) and lines[1]["fused"] == MEMBERS
    # Member 3's catch-up epoch is its solo epoch: the same loss, to the bit.
    caught_up = json.loads((behind / "metrics.jsonl").read_text().splitlines()[0])
    solo = json.loads((trained["solo"] / behind.name / "metrics.jsonl").read_text().splitlines()[0])
    assert caught_up["train_loss"] == solo["train_loss"] and caught_up["top1"] == solo["top1"]
    # Resuming a finished group does nothing and reports every member.
    out = run_cli("train", *data, "--out", str(killed), "--resume", *E2E).stdout
    assert all(f"sub-{k:02d}: top1" in out for k in range(MEMBERS))


def _fails_with(message: str, *args: str) -> None:
    fails_with_one_line("train", message, *args)


def test_members_go_in_groups_of_k_and_the_rest_alone(small4, tmp_path):
    run_cli("train", "--data", str(small4), "--shard", "1-3", "--fuse", "2", "--out", str(tmp_path), "--config",
            "sample", "--no-progress", "schedule.epochs=1", "data.batch_size=100")
    fused = {k: "fused" in json.loads((tmp_path / f"sub-{k:02d}" / "metrics.jsonl").read_text()) for k in (1, 2, 3)}
    assert fused == {1: True, 2: True, 3: False}
    assert all((tmp_path / f"sub-{k:02d}" / "final.json").is_file() for k in (1, 2, 3))


def test_fused_groups_refuse_torchrun():
    from subspectral.train.config import ConfigError
    from subspectral.train.fused_trainer import FusedGroup

    with pytest.raises(ConfigError, match="not under torchrun"):
        FusedGroup([], load_recipe("sample"), DistInfo(rank=0, world=2), torch.device("cpu"))


def test_bad_fuse_values_fail_with_one_line(small4, tmp_path):
    data = ("--data", str(small4), "--out", str(tmp_path), "--no-progress")
    _fails_with("train.fuse must be >= 1", *data, "--shard", "0-1", "--fuse", "0")
    _fails_with("train.fuse must be an integer", *data, "train.fuse=two")
    _fails_with("not supported by --backend mindspore", *data, "--fuse", "2", "--backend", "mindspore")
    _fails_with("--shard names a member twice", *data, "--shard", "1,1", "--fuse", "2")
    result = run_cli("ensemble-eval", "--data", str(small4), "--runs", str(tmp_path), "--fuse", "0", check=False)
    assert result.returncode == 2 and "--fuse must be at least 1" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing written
