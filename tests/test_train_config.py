"""Recipes: the shipped set loads, overrides apply with types checked, unknown keys are refused."""

from __future__ import annotations

import dataclasses

import pytest
from subspectral.train.config import (
    LIST_RANGES,
    RANGES,
    ConfigError,
    Recipe,
    apply_overrides,
    check_recipe,
    list_recipes,
    load_recipe,
    recipe_from_dict,
)
from subspectral.train.epochs import resume_note

SEED_RECIPES = ("imagenet1k", "imagenet21k-sub36", "imagenet21k-sub36-cosine", "resnet50-ebv", "resnext50", "sample")


def test_shipped_recipes_load_and_match_the_seed():
    assert set(SEED_RECIPES) <= set(list_recipes())
    for name in list_recipes():
        assert load_recipe(name).name == name
    in1k = load_recipe("imagenet1k")
    assert (in1k.schedule.epochs, in1k.data.batch_size, in1k.optimizer.lr) == (100, 256, 0.01)
    assert in1k.schedule.name == "cosine"
    assert (in1k.optimizer.momentum, in1k.optimizer.weight_decay, in1k.schedule.min_lr) == (0.9, 1e-4, 1e-4)
    in21k = load_recipe("imagenet21k-sub36")
    assert (in21k.data.batch_size, in21k.optimizer.lr, in21k.schedule.name) == (512, 0.001, "step")
    assert (in21k.schedule.step_epochs, in21k.schedule.gamma) == (30, 0.1)
    assert load_recipe("imagenet21k-sub36-cosine").optimizer.lr == 0.01
    ebv = load_recipe("resnet50-ebv").model
    assert (ebv.name, ebv.head, ebv.ebv_dim, ebv.ebv_tau, ebv.ebv_threshold, ebv.ebv_seed) == (
        "resnet50", "ebv", 1000, 0.07, 0.002, 42)
    assert load_recipe("resnext50").model.name == "resnext50_32x4d"


def test_shipped_recipes_keep_cpu_runs_in_float32():
    # train.amp=true would autocast on the CPU too; the shipped recipes autocast on CUDA only.
    for name in list_recipes():
        assert load_recipe(name).train.amp in ("auto", False), name


def test_overrides_apply_with_types():
    overrides = ["optimizer.lr=0.05", "train.ema_decay=0.999", "data.hflip=false", "model.ebv_dim=null",
                 "data.mean=[0.4,0.5,0.6]"]
    recipe = apply_overrides(load_recipe("sample"), overrides)
    assert recipe.optimizer.lr == 0.05 and recipe.train.ema_decay == 0.999 and recipe.data.hflip is False
    assert recipe.data.mean == [0.4, 0.5, 0.6] and recipe.model.ebv_dim is None
    assert apply_overrides(load_recipe("sample"), ["optimizer.lr=1"]).optimizer.lr == 1.0
    for text, value in (("auto", "auto"), ("true", True), ("false", False)):
        assert apply_overrides(load_recipe("sample"), [f"train.amp={text}"]).train.amp == value
    assert apply_overrides(load_recipe("sample"), ["train.compile_backend=aot_eager"]).train.compile_backend == (
        "aot_eager")


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=0.1", "unknown recipe key 'optimizer.lrr'"),
    ("optimiser.lr=0.1", "unknown recipe section 'optimiser'"),
    ("optimizer.lr=fast", "optimizer.lr must be a number"),
    ("data.batch_size=1.5", "data.batch_size must be an integer"),
    ("model.stem=tiny", "model.stem must be one of auto, imagenet, lowres"),
    ("data.crop_padding=1.5", "data.crop_padding must be pixels"),
    ("data.crop_padding=-2", "data.crop_padding must be pixels"),
    ("data.crop_padding=true", "data.crop_padding must be pixels"),
    ("train.amp=cpu", "train.amp must be true, false or auto, got 'cpu'"),
    ("train.amp=1", "train.amp must be true, false or auto, got 1"),
    ("train.compile_backend=tvm", "train.compile_backend must be one of inductor, aot_eager, eager"),
    ("lr=0.1", "must look like section.key=value"),
])
def test_bad_overrides_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        apply_overrides(load_recipe("sample"), [override])


def test_unknown_yaml_key_and_recipe_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe key 'train.warmup'"):
        recipe_from_dict({"train": {"warmup": 5}}, "x")
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  name: resnet34\nschedule:\n  epochs: 3\n")
    recipe = load_recipe(str(path))
    assert (recipe.name, recipe.model.name, recipe.schedule.epochs) == ("mine", "resnet34", 3)


def test_crop_padding_takes_pixels_or_a_fraction_of_the_side():
    assert apply_overrides(load_recipe("sample"), ["data.crop_padding=3"]).data.crop_padding == 3
    assert apply_overrides(load_recipe("sample"), ["data.crop_padding=0.125"]).data.crop_padding == 0.125
    assert apply_overrides(load_recipe("sample"), ["data.crop_padding=2.0"]).data.crop_padding == 2  # pixels


def test_small_recipe_picks_stem_and_padding_from_the_size_and_the_others_are_unchanged_at_56():
    from subspectral.train.stream import padding_pixels

    small = load_recipe("small")
    assert small.model.stem == "auto" and small.data.crop_padding == 0.125
    # The seed recipes keep the source's 4 px at 56 (default 4/56 of the side); sample sets 4 px itself.
    for name in SEED_RECIPES:
        recipe = load_recipe(name)
        assert padding_pixels(recipe.data.crop_padding, 56) == 4, name
        assert recipe.model.stem in ("imagenet", "lowres"), name


@pytest.mark.parametrize("override, message", [
    # The values of issue 11 (items 8 and 13), then one per kind of range.
    ("data.batch_size=-32", "data.batch_size must be >= 1, got -32"),
    ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("train.accumulate_steps=0", "train.accumulate_steps must be >= 1, got 0"),
    ("train.val_every=0", "train.val_every must be >= 1, got 0"),
    ("data.workers=-1", "data.workers must be >= 0, got -1"),
    ("optimizer.lr=.nan", "optimizer.lr must be a finite number, got nan"),
    ("optimizer.lr=nan", "optimizer.lr must be a finite number, got nan"),
    ("optimizer.lr=-.inf", "optimizer.lr must be a finite number, got -inf"),
    ("optimizer.lr=0", "optimizer.lr must be > 0, got 0"),
    ("optimizer.momentum=1", "optimizer.momentum must be in [0, 1), got 1"),
    ("schedule.gamma=0", "schedule.gamma must be in (0, 1], got 0"),
    ("train.seed=-1", "train.seed must be in [0, 4294967296), got -1"),
    ("model.ebv_dim=0", "model.ebv_dim must be >= 1, got 0"),
    ("data.std=[0.5,0,0.5]", "data.std must be > 0, got 0"),
    ("data.mean=[0.5,0.5]", "data.mean must hold 3 values (one per channel), got 2"),
    ("schedule.min_lr=0.1", "schedule.min_lr=0.1 exceeds optimizer.lr=0.002"),
])
def test_values_out_of_range_are_refused_naming_the_key(override, message):
    recipe = apply_overrides(load_recipe("sample"), [override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_recipe(recipe)


def test_every_numeric_key_has_a_range_and_the_shipped_recipes_pass():
    for section in dataclasses.fields(Recipe):
        if section.name in ("name", "description"):
            continue
        for key in dataclasses.fields(section.default_factory()):
            path = f"{section.name}.{key.name}"
            kind = str(key.type)
            if "list" in kind:
                assert path in LIST_RANGES, path
            elif ("int" in kind or "float" in kind) and "bool" not in kind:
                assert path in RANGES, path
    for name in list_recipes():
        check_recipe(load_recipe(name))
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float key takes it as the number it is.
    assert apply_overrides(load_recipe("sample"), ["optimizer.lr=1e-3"]).optimizer.lr == 0.001


def test_resume_accepts_only_a_longer_schedule():
    saved = load_recipe("sample").to_dict()
    same = load_recipe("sample")
    assert resume_note(saved, same, trained_epochs=3) == ""
    cadence = apply_overrides(load_recipe("sample"), ["train.val_every=4", "train.checkpoint_every=2"])
    assert resume_note(saved, cadence, trained_epochs=3) == ""
    longer = apply_overrides(load_recipe("sample"), ["schedule.epochs=12"])
    assert resume_note(saved, longer, trained_epochs=3).startswith(
        "# --resume extended schedule.epochs from 8 to 12 after epoch 3")
    with pytest.raises(ConfigError, match="schedule.epochs may grow on resume, never shrink"):
        resume_note(saved, apply_overrides(load_recipe("sample"), ["schedule.epochs=4"]), trained_epochs=3)
    for override, key in (("optimizer.lr=0.01", "optimizer.lr"), ("optimizer.name=sgd", "optimizer.name"),
                          ("data.batch_size=64", "data.batch_size"), ("model.head=ebv", "model.head")):
        with pytest.raises(ConfigError, match=f"--resume with another recipe: {key} is"):
            resume_note(saved, apply_overrides(load_recipe("sample"), [override]), trained_epochs=3)
