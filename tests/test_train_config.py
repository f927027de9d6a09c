"""Recipes: the shipped set loads, overrides apply with types checked, unknown keys are refused."""

from __future__ import annotations

import pytest
from subspectral.train.config import ConfigError, apply_overrides, list_recipes, load_recipe, recipe_from_dict

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
