"""Listing (layouts, structural rejects, unsafe tar members) and planning (keys, splits, shards)."""

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from corpora import (
    GOOD_PER_CLASS,
    TAR_QUIRKS,
    add_folder_quirks,
    add_link_quirks,
    add_tar_quirks,
    class_tars,
    image_folder,
    jpeg,
)
from subspectral.pipeline.listing import combine, list_unit, plan_units
from subspectral.pipeline.plan import PlanOptions, make_keys, make_plan
from subspectral.pipeline.storage import location


def list_all(root, layout="auto"):
    units, rejects = plan_units([location(root).uri], layout)
    return combine([list_unit(unit) for unit in units], rejects)


def reasons_by_name(rejects):
    return {row["source"].rsplit("/", 1)[-1]: row["reason"] for row in rejects.to_pylist()}


def test_image_folder_lists_images_and_rejects_structure(tmp_path):
    root = image_folder(tmp_path / "corpus")
    add_folder_quirks(root)
    inputs, rejects = list_all(root)
    reasons = reasons_by_name(rejects)
    assert reasons == {"README.txt": "stray_file", "notes.txt": "stray_file", ".DS_Store": "stray_file",
                       "n004_empty_class": "empty_class"}
    # Files with image names are inputs; decoding decides about the rest.
    assert inputs.num_rows == 3 * GOOD_PER_CLASS + 13
    assert set(inputs.column("class").to_pylist()) == {"n001", "n002", "n003"}


def test_links_loops_and_special_files_end_up_listed_once_or_rejected(tmp_path):
    root = image_folder(tmp_path / "corpus")
    expected = add_link_quirks(root, tmp_path / "outside")
    inputs, rejects = list_all(root)
    sources = inputs.column("source").to_pylist()
    assert sorted(sources) == sorted(str(p) for p in root.glob("n00*/n00*_*.JPEG"))  # the 18 real files, once each
    got = {row["source"].split(str(root) + "/", 1)[1]: row["reason"] for row in rejects.to_pylist()}
    assert got == expected
    assert not any("elsewhere" in source for source in sources)


def test_a_question_mark_in_a_local_path_is_part_of_the_path(tmp_path):
    root = tmp_path / "c?x=1"
    (root / "cat?dup").mkdir(parents=True)
    (root / "cat?dup" / "a?b.JPEG").write_bytes(jpeg(1))
    (root / "cat").mkdir()
    (root / "cat" / "c.JPEG").write_bytes(jpeg(2))
    inputs, rejects = list_all(root)
    assert rejects.num_rows == 0
    assert sorted(zip(inputs.column("class").to_pylist(), inputs.column("source").to_pylist(), strict=True)) == [
        ("cat", str(root / "cat" / "c.JPEG")), ("cat?dup", str(root / "cat?dup" / "a?b.JPEG"))]
    (tmp_path / "list?.csv").write_text("path,label\nc?x=1/cat?dup/a?b.JPEG,q\n")
    listed, _ = list_all(tmp_path / "list?.csv")
    assert listed.column("source").to_pylist() == [str(root / "cat?dup" / "a?b.JPEG")]


def test_a_list_that_is_not_a_list_is_refused_in_one_line(tmp_path):
    (tmp_path / "photo.csv").write_bytes(jpeg(3))
    with pytest.raises(ValueError, match="not a CSV list of images") as caught:
        list_all(tmp_path / "photo.csv")
    assert "\n" not in str(caught.value) and all(" " <= c <= "~" or c == "…" for c in str(caught.value))
    (tmp_path / "photo.JPEG").write_bytes(jpeg(3))
    with pytest.raises(ValueError, match="is an image; give the folder"):
        list_all(tmp_path / "photo.JPEG")


def test_class_tars_locate_members_in_place_and_never_follow_unsafe_ones(tmp_path):
    root = class_tars(tmp_path / "tars")
    add_tar_quirks(root)
    inputs, rejects = list_all(root)
    expected = {(tar if member is None else f"{tar}#{member}"): reason for (tar, member), reason in TAR_QUIRKS.items()
                if reason != "truncated"}
    got = {row["source"].split("/tars/", 1)[1]: row["reason"] for row in rejects.to_pylist()}
    assert got == expected
    names = inputs.column("member").to_pylist()
    assert not any(n.startswith("/") or ".." in n or "evil" in n for n in names)
    # Offsets point at the member's bytes inside the tar.
    row = inputs.filter(pc.equal(inputs.column("member"), "n005_1.JPEG")).to_pylist()[0]
    data = (root / "n005.tar").read_bytes()[row["offset"]: row["offset"] + row["size"]]
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


def test_list_file_with_relative_paths_and_given_splits(tmp_path):
    root = image_folder(tmp_path / "corpus")
    lines = ["path,label,split"] + [f"n001/n001_{i}.JPEG,cat,{'val' if i < 2 else 'train'}" for i in range(4)]
    (tmp_path / "corpus" / "list.csv").write_text("\n".join(lines) + "\n")
    inputs, rejects = list_all(root / "list.csv")
    assert rejects.num_rows == 0
    assert inputs.column("source").to_pylist()[0] == str(root / "n001" / "n001_0.JPEG")
    plan = make_plan(inputs, PlanOptions(shard_size=10, seed=0))
    assert sorted(plan.rows.column("split").to_pylist()) == ["train", "train", "val", "val"]
    (tmp_path / "bad.csv").write_text("file,label\nx.jpg,a\n")
    with pytest.raises(ValueError, match="'path'"):
        list_all(tmp_path / "bad.csv")


@pytest.mark.parametrize("rows, message", [
    (["a.jpg,0", "b.jpg,", "c.jpg,1"], "1 row(s) with a blank 'label' (the first is data row 2)"),  # numeric labels
    (["a.jpg,cat", "b.jpg, ", "c.jpg,dog"], "1 row(s) with a blank 'label' (the first is data row 2)"),  # text
    (["a.jpg,cat", ",dog", ",dog"], "2 row(s) with a blank 'path' (the first is data row 2)"),
])
def test_list_file_with_a_blank_cell_is_refused_in_one_line(tmp_path, rows, message):
    (tmp_path / "list.csv").write_text("\n".join(["path,label", *rows]) + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        list_all(tmp_path / "list.csv")
    assert "\n" not in str(raised.value)


def test_train_val_folders_are_kept(tmp_path):
    image_folder(tmp_path / "c" / "train")
    image_folder(tmp_path / "c" / "val", classes=("n001", "n002"))
    inputs, _ = list_all(tmp_path / "c")
    plan = make_plan(inputs, PlanOptions(shard_size=100, seed=0, val_per_class=3))
    counts = plan.rows.group_by("split").aggregate([("key", "count")]).to_pylist()
    assert {c["split"]: c["key_count"] for c in counts} == {"train": 3 * GOOD_PER_CLASS, "val": 2 * GOOD_PER_CLASS}


def test_keys_have_no_dots_are_unique_and_do_not_depend_on_order():
    names = pa.array(["a.b.c.JPEG", "x y.jpg", "ß.png", "same.JPEG", "same.jpg", "n1_2.JPEG", ".jpg"])
    sources = [f"/c/{i}/{n}" for i, n in enumerate(names.to_pylist())]
    keys = make_keys(names, sources)
    assert keys[:3] == ["a_b_c", "x_y", "_"]
    assert keys[3].startswith("same-") and keys[4].startswith("same-") and keys[3] != keys[4]
    assert keys[5] == "n1_2"
    assert all("." not in k and k for k in keys)
    reordered = make_keys(pa.array(names.to_pylist()[::-1]), sources[::-1])
    assert reordered[::-1] == keys


def _inputs(per_class: dict[str, int]) -> pa.Table:
    rows = [(f"/c/{c}/{c}_{i}.JPEG", c, f"{c}_{i}.JPEG") for c, n in per_class.items() for i in range(n)]
    return pa.table({"source": [r[0] for r in rows], "member": pa.nulls(len(rows), pa.string()),
                     "offset": [-1] * len(rows), "size": [100] * len(rows), "name": [r[2] for r in rows],
                     "class": [r[1] for r in rows], "split": pa.nulls(len(rows), pa.string())})


def test_plan_holds_out_val_by_hash_drops_rare_classes_and_mixes_shards():
    inputs = _inputs({"b": 40, "a": 30, "rare": 3})
    options = PlanOptions(shard_size=16, seed=7, val_per_class=5, min_per_class=10)
    plan = make_plan(inputs, options)
    assert plan.classes == ["a", "b"]
    assert plan.rejects.column("reason").to_pylist() == ["below_min_per_class"] * 3
    rows = plan.rows.to_pylist()
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 10 and {r["class"] for r in val} == {"a", "b"}
    train = [r for r in rows if r["split"] == "train"]
    assert [(r["shard"], r["position"]) for r in train] == [(i // 16, i % 16) for i in range(60)]
    assert len({r["class"] for r in train[:16]}) == 2  # shuffled before sharding
    # The same inputs in another order give the same plan; another seed gives another one.
    shuffled = inputs.take(pa.array(list(range(inputs.num_rows))[::-1]))
    assert make_plan(shuffled, options).rows.equals(plan.rows)
    other = make_plan(inputs, PlanOptions(shard_size=16, seed=8, val_per_class=5, min_per_class=10))
    assert other.rows.column("key").to_pylist() != plan.rows.column("key").to_pylist()


def test_a_class_keeps_at_least_one_training_image():
    plan = make_plan(_inputs({"a": 3}), PlanOptions(shard_size=10, seed=0, val_per_class=50))
    assert sorted(plan.rows.column("split").to_pylist()) == ["train", "val", "val"]
