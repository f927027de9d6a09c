"""Listing (layouts, structural rejects, unsafe tar members) and planning (keys, splits, shards)."""

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
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
from subspectral.pipeline.listing import combine, list_unit, plan_units, source_uris
from subspectral.pipeline.plan import PlanOptions, hash_order, make_plan
from subspectral.pipeline.storage import location
from subspectral.schemas.tables import INPUTS_SCHEMA


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
    listed = {str(p) for p in root.glob("n00*/*") if p.suffix in (".JPEG", ".jpg", ".png")}
    assert set(source_uris(inputs).to_pylist()) == listed


def test_links_loops_and_special_files_end_up_listed_once_or_rejected(tmp_path):
    root = image_folder(tmp_path / "corpus")
    expected = add_link_quirks(root, tmp_path / "outside")
    inputs, rejects = list_all(root)
    sources = source_uris(inputs).to_pylist()
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
    assert sorted(zip(inputs.column("class").to_pylist(), source_uris(inputs).to_pylist(), strict=True)) == [
        ("cat", str(root / "cat" / "c.JPEG")), ("cat?dup", str(root / "cat?dup" / "a?b.JPEG"))]
    (tmp_path / "list?.csv").write_text("path,label\nc?x=1/cat?dup/a?b.JPEG,q\n")
    listed, _ = list_all(tmp_path / "list?.csv")
    assert source_uris(listed).to_pylist() == [str(root / "cat?dup" / "a?b.JPEG")]


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
    names = inputs.column("entry").to_pylist()
    assert not any(n.startswith("/") or ".." in n or "evil" in n for n in names)
    # Offsets point at the member's bytes inside the tar.
    row = inputs.filter(pc.equal(inputs.column("entry"), "n005_1.JPEG")).to_pylist()[0]
    data = (root / "n005.tar").read_bytes()[row["offset"]: row["offset"] + row["size"]]
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


def test_list_file_with_relative_paths_and_given_splits(tmp_path):
    root = image_folder(tmp_path / "corpus")
    lines = ["path,label,split"] + [f"n001/n001_{i}.JPEG,cat,{'val' if i < 2 else 'train'}" for i in range(4)]
    (tmp_path / "corpus" / "list.csv").write_text("\n".join(lines) + "\n")
    inputs, rejects = list_all(root / "list.csv")
    assert rejects.num_rows == 0
    assert source_uris(inputs).to_pylist()[0] == str(root / "n001" / "n001_0.JPEG")
    plan = make_plan(inputs, PlanOptions(shard_size=10, seed=0))
    assert plan.split_sizes() == {"train": 2, "val": 2}
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
    assert plan.split_sizes() == {"train": 3 * GOOD_PER_CLASS, "val": 2 * GOOD_PER_CLASS}


def _inputs(per_class: dict[str, int], names: list[str] | None = None, folders: list[str] | None = None,
            splits: list[str | None] | None = None) -> pa.Table:
    """Listed rows of plain files: ``per_class`` images per class in /c/CLASS, or the names and folders given."""
    rows = [(f"/c/{c}", f"{c}_{i}.JPEG", c) for c, n in per_class.items() for i in range(n)]
    count = len(rows)
    plain = pa.table({"parent": folders or [r[0] for r in rows], "entry": names or [r[1] for r in rows],
                      "offset": [-1] * count, "size": [100] * count, "class": [r[2] for r in rows],
                      "split": pa.array(splits or [None] * count, pa.string())})
    return pa.table([pc.dictionary_encode(plain.column(f.name)) if pa.types.is_dictionary(f.type)
                     else plain.column(f.name).cast(f.type) for f in INPUTS_SCHEMA], schema=INPUTS_SCHEMA)


def all_rows(plan, shard_size: int = 10**9) -> list[dict]:
    """Every planned input's PLAN_SCHEMA row, in plan order."""
    return pa.concat_tables([plan.shard_rows(shard, shard_size) for shard in plan.shards(shard_size)]).to_pylist()


def keys_by_source(plan) -> dict[str, str]:
    return {row["source"]: row["key"] for row in all_rows(plan)}


def test_keys_have_no_dots_are_unique_and_do_not_depend_on_order():
    names = ["a.b.c.JPEG", "x y.jpg", "ß.png", "same.JPEG", "same.jpg", "n1_2.JPEG", ".jpg"]
    inputs = _inputs({"c": len(names)}, names)
    plan = make_plan(inputs, PlanOptions(1, 0))
    keys = {source.rsplit("/", 1)[1]: key for source, key in keys_by_source(plan).items()}
    assert [keys[n] for n in names[:3]] == ["a_b_c", "x_y", "_"]
    assert keys["same.JPEG"].startswith("same-") and keys["same.jpg"].startswith("same-")
    assert keys["same.JPEG"] != keys["same.jpg"]
    assert keys["n1_2.JPEG"] == "n1_2"
    assert all("." not in k and k for k in keys.values())
    reordered = make_plan(inputs.take(pa.array(range(len(names) - 1, -1, -1))), PlanOptions(1, 0))
    assert {s.rsplit("/", 1)[1]: k for s, k in keys_by_source(reordered).items()} == keys


def test_a_key_is_unique_even_when_a_file_is_named_like_a_renamed_key():
    # Two files named same.jpg get "same-" + 10 hex digits of their URI's hash; a third file is named exactly
    # that. The first rename collides with it: both get the longer suffix, and every key stays unique.
    suffix = hashlib.blake2b(b"/a/same.jpg", digest_size=8).hexdigest()[:10]
    inputs = _inputs({"c": 3}, names=["same.jpg", "same.jpg", f"same-{suffix}.jpg"], folders=["/a", "/b", "/a"])
    keys = keys_by_source(make_plan(inputs, PlanOptions(1, 0)))
    assert len(set(keys.values())) == 3
    assert keys["/b/same.jpg"] == "same-" + hashlib.blake2b(b"/b/same.jpg", digest_size=8).hexdigest()[:10]


def test_duplicate_inputs_are_rejected_and_never_share_a_key(tmp_path):
    """issue 11, item 2: a path listed twice gave the same key twice in one tar, or one image in train and val."""
    lines = ["path,label,split",
             "a/x.jpg,cat,train", "a/x.jpg,cat,train",  # the same input twice: one is kept
             "a/y.jpg,cat,", "a/y.jpg,dog,",  # under two labels: neither is
             "a/z.jpg,cat,train", "a/z.jpg,cat,val",  # in both splits: neither is
             "a/w.jpg,dog,", "b/w.jpg,dog,"]  # two files of one name: both kept, with their own keys
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    inputs, _ = list_all(tmp_path / "list.csv")
    plan = make_plan(inputs, PlanOptions(shard_size=2, seed=0))
    rows = all_rows(plan, 2)
    assert sorted(r["source"].split(str(tmp_path) + "/")[1] for r in rows) == ["a/w.jpg", "a/x.jpg", "b/w.jpg"]
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == len(keys)
    rejects = {(r["source"].split(str(tmp_path) + "/")[1], r["reason"]) for r in plan.rejects.table(inputs).to_pylist()}
    assert rejects == {("a/x.jpg", "duplicate_input"), ("a/y.jpg", "duplicate_input"),
                       ("a/z.jpg", "duplicate_input")}
    assert plan.rejects.num_rows == 5  # one copy of x, both of y, both of z
    assert plan.num_rows + plan.rejects.num_rows == inputs.num_rows


def test_numeric_class_names_are_ordered_as_numbers():
    plan = make_plan(_inputs({str(label): 1 for label in (10, 2, 0, 1)}), PlanOptions(1, 0))
    assert plan.classes == ["0", "1", "2", "10"]
    assert make_plan(_inputs({"10": 1, "b": 1, "2": 1}), PlanOptions(1, 0)).classes == ["10", "2", "b"]


def test_plan_holds_out_val_by_hash_drops_rare_classes_and_mixes_shards():
    inputs = _inputs({"b": 40, "a": 30, "rare": 3})
    options = PlanOptions(shard_size=16, seed=7, val_per_class=5, min_per_class=10)
    plan = make_plan(inputs, options)
    assert plan.classes == ["a", "b"]
    assert plan.rejects.table(inputs).column("reason").to_pylist() == ["below_min_per_class"] * 3
    rows = all_rows(plan, 16)
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 10 and {r["class"] for r in val} == {"a", "b"}
    train = [r for r in rows if r["split"] == "train"]
    assert [(r["shard"], r["position"]) for r in train] == [(i // 16, i % 16) for i in range(60)]
    assert len({r["class"] for r in train[:16]}) == 2  # shuffled before sharding
    # The same inputs in another order give the same plan; another seed gives another one.
    shuffled = inputs.take(pa.array(list(range(inputs.num_rows))[::-1]))
    assert all_rows(make_plan(shuffled, options), 16) == rows
    other = make_plan(inputs, PlanOptions(shard_size=16, seed=8, val_per_class=5, min_per_class=10))
    assert [r["key"] for r in all_rows(other, 16)] != [r["key"] for r in rows]


def test_a_class_keeps_at_least_one_training_image():
    plan = make_plan(_inputs({"a": 3}), PlanOptions(shard_size=10, seed=0, val_per_class=50))
    assert plan.split_sizes() == {"train": 1, "val": 2}


# The planner must hold 13 M inputs in a driver of ~2 GB: a Python object per input (≥ 36 bytes with its
# list slot) is what made the old planner take 12 GB. tracemalloc sees Python objects and numpy arrays (not
# Arrow's buffers); the old planner peaked at ~560 bytes per row here, the new one at ~60.
PLANNING_PROBE = textwrap.dedent("""
    import sys, tracemalloc
    import numpy as np, pyarrow as pa, pyarrow.csv as pacsv
    from subspectral.pipeline.listing import ListingUnit, list_unit
    from subspectral.pipeline.plan import PlanOptions, hash_order, make_plan
    rows, classes, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    label = np.random.default_rng(0).integers(0, classes, rows)
    names = np.char.add("n", np.char.zfill(label.astype(str), 8))
    paths = np.char.add(np.char.add(np.char.add(names, "/"), names), np.char.add("_", np.arange(rows).astype(str)))
    pacsv.write_csv(pa.table({"path": np.char.add(paths, ".JPEG"), "label": names}), path)
    del label, names, paths
    inputs = list_unit(ListingUnit("list", path, None, None)).inputs
    tracemalloc.start()
    plan = make_plan(inputs, PlanOptions(shard_size=5000, seed=0, val_per_class=5, min_per_class=50))
    print(tracemalloc.get_traced_memory()[1])
""")


def test_planning_200k_inputs_creates_no_python_object_per_input(tmp_path):
    rows = 200_000
    result = subprocess.run([sys.executable, "-c", PLANNING_PROBE, str(rows), "1000", str(tmp_path / "list.csv")],
                            capture_output=True, text=True, timeout=600, check=True)
    peak = int(result.stdout.split()[-1])
    assert peak / rows < 100, f"planning peaked at {peak / rows:.0f} bytes per input in Python objects and numpy"


def test_equal_hashes_are_ordered_by_group_then_key():
    """The shuffle's order is (group, hash, key); equal 64-bit hashes never happen in practice, so force them."""
    hashes = np.array([5, 5, 3, 5, 2**63 + 5], np.uint64)
    keys = pa.array(["b", "a", "c", "a0", "d"])

    def key_of(positions):
        return keys.take(pa.array(positions))

    grouped = hash_order(hashes, key_of, np.arange(5), groups=np.array([1, 1, 1, 0, 1]))
    assert grouped.tolist() == [3, 2, 1, 0, 4]
    assert hash_order(hashes, key_of, np.arange(5)).tolist() == [2, 1, 3, 0, 4]


def test_take_rows_equals_arrow_take_on_a_table_of_several_chunks():
    from subspectral.pipeline.plan import take_rows

    rng = np.random.default_rng(0)
    chunks = [pa.table({"entry": pa.array([f"n{i}.JPEG" for i in range(start, start + size)]),
                        "class": pa.array([f"c{i % 7}" for i in range(size)]).dictionary_encode(),
                        "offset": pa.array(np.arange(size, dtype=np.int64))})
              for start, size in ((0, 5), (5, 1), (6, 9), (15, 4))]
    table = pa.concat_tables(chunks).unify_dictionaries()
    assert table.column("entry").num_chunks == 4
    for rows in (rng.integers(0, 19, 30), np.array([18, 0, 5, 5, 6]), np.array([], np.int64), np.arange(19)[::-1]):
        taken = take_rows(table, rows)
        assert taken.schema == table.schema
        assert taken.to_pylist() == table.take(pa.array(rows, pa.int64())).to_pylist()
