"""Sources → one Arrow table of inputs (+ a table of structural rejects). I/O, no scheduling.

Layouts (``--layout``, detected by default):
* ``imagefolder``: ROOT/CLASS/…/IMAGE (one folder per class), optionally ROOT/{train,val}/CLASS/….
* ``class-tars``: ROOT/CLASS.tar holding the class's images (the ImageNet-21K release); members are
  located by offset and read in place later, never extracted. Links, devices, absolute names and
  names with ``..`` are never followed: they become ``unsafe_tar_member`` rejects.
* ``list``: a CSV or Parquet file with a ``path`` (or ``uri``) column and a ``label`` column (class
  name), optionally ``split``; relative paths are relative to the list file.

Listing is split into units (a class folder, a class tar, a list file) so that the distributor
can list a 19,000-tar corpus in parallel and no corpus-sized list of Python objects is built.
"""

from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from subspectral.schemas.reasons import RejectReason
from subspectral.schemas.tables import INPUTS_SCHEMA, REJECTS_SCHEMA

from .storage import Location

LAYOUTS = ("auto", "imagefolder", "class-tars", "list")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
SPLIT_FOLDERS = ("train", "val")


@dataclass(frozen=True)
class ListingUnit:
    """One piece of listing work: a class folder, a class tar, or a list file."""

    kind: str  # "folder" | "tar" | "list"
    uri: str
    class_name: str | None
    split: str | None


@dataclass
class Listed:
    inputs: pa.Table
    rejects: pa.Table


def plan_units(sources: list[str], layout: str) -> tuple[list[ListingUnit], pa.Table]:
    """The listing units of every source, and the stray entries found at the top levels."""
    units: list[ListingUnit] = []
    rejects = _RejectBuilder()
    for source in sources:
        loc = Location(source)
        filesystem, path = loc.resolve()
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"--src {source}: no such file or folder")
        kind = layout
        if info.type == pafs.FileType.File:
            if layout not in ("auto", "list"):
                raise ValueError(f"--src {source} is a file; only --layout list takes a file")
            units.append(ListingUnit("list", source, None, None))
            continue
        entries = _list_dir(filesystem, path)
        names = {posixpath.basename(e.path): e for e in entries}
        split_roots = [n for n in SPLIT_FOLDERS if n in names and names[n].type == pafs.FileType.Directory]
        roots = [(loc.join(n), n) for n in split_roots] if split_roots else [(loc, None)]
        if split_roots:
            for name in names:
                if name not in split_roots:
                    rejects.add(loc.join(name).uri, RejectReason.STRAY_FILE,
                                "not a split folder next to train/ and val/")
        for root, split in roots:
            root_fs, root_path = root.resolve()
            root_entries = entries if split is None else _list_dir(root_fs, root_path)
            kind = layout if layout != "auto" else _detect(root_entries)
            for entry in root_entries:
                name = posixpath.basename(entry.path)
                child = root.join(name)
                if kind == "class-tars" and entry.type == pafs.FileType.File and name.endswith(".tar"):
                    units.append(ListingUnit("tar", child.uri, name[: -len(".tar")], split))
                elif kind == "imagefolder" and entry.type == pafs.FileType.Directory:
                    units.append(ListingUnit("folder", child.uri, name, split))
                else:
                    expected = "tar" if kind == "class-tars" else "folder"
                    rejects.add(child.uri, RejectReason.STRAY_FILE, f"not a class {expected}")
    return units, rejects.table()


def _detect(entries: list[pafs.FileInfo]) -> str:
    tars = sum(1 for e in entries if e.type == pafs.FileType.File and e.path.endswith(".tar"))
    folders = sum(1 for e in entries if e.type == pafs.FileType.Directory)
    return "class-tars" if tars > folders else "imagefolder"


def _list_dir(filesystem: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=recursive))
    return sorted(infos, key=lambda info: info.path)


def list_unit(unit: ListingUnit) -> Listed:
    """List one unit into rows of ``INPUTS_SCHEMA`` and ``REJECTS_SCHEMA``."""
    if unit.kind == "folder":
        return _list_folder(unit)
    if unit.kind == "tar":
        return _list_tar(unit)
    return _list_file(unit)


class _RejectBuilder:
    def __init__(self) -> None:
        self.rows: dict[str, list[str]] = {"source": [], "reason": [], "detail": []}

    def add(self, source: str, reason: RejectReason, detail: str) -> None:
        self.rows["source"].append(source)
        self.rows["reason"].append(reason.value)
        self.rows["detail"].append(detail)

    def table(self) -> pa.Table:
        return pa.table(self.rows, schema=REJECTS_SCHEMA)


class _InputBuilder:
    def __init__(self, class_name: str | None, split: str | None) -> None:
        self.class_name = class_name
        self.split = split
        self.rows: dict[str, list] = {name: [] for name in INPUTS_SCHEMA.names}

    def add(self, source: str, member: str | None, offset: int, size: int, name: str,
            class_name: str | None = None, split: str | None = None) -> None:
        row = self.rows
        row["source"].append(source)
        row["member"].append(member)
        row["offset"].append(offset)
        row["size"].append(size)
        row["name"].append(name)
        row["class"].append(class_name if class_name is not None else self.class_name)
        row["split"].append(split if split is not None else self.split)

    def table(self) -> pa.Table:
        return pa.table(self.rows, schema=INPUTS_SCHEMA)


def _is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_folder(unit: ListingUnit) -> Listed:
    loc = Location(unit.uri)
    filesystem, path = loc.resolve()
    inputs, rejects = _InputBuilder(unit.class_name, unit.split), _RejectBuilder()
    for info in _list_dir(filesystem, path, recursive=True):
        if info.type != pafs.FileType.File:
            continue
        relative = posixpath.relpath(info.path, path)
        name = posixpath.basename(info.path)
        source = loc.join(relative).uri
        if _is_image_name(name) and not name.startswith("."):
            inputs.add(source, None, -1, info.size, name)
        else:
            rejects.add(source, RejectReason.STRAY_FILE, "not an image file name")
    table = inputs.table()
    if table.num_rows == 0:
        rejects.add(unit.uri, RejectReason.EMPTY_CLASS, "class folder holds no image")
    return Listed(table, rejects.table())


def _list_tar(unit: ListingUnit) -> Listed:
    filesystem, path = Location(unit.uri).resolve()
    inputs, rejects = _InputBuilder(unit.class_name, unit.split), _RejectBuilder()
    try:
        with filesystem.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                _list_tar_member(unit.uri, member, inputs, rejects)
    except (tarfile.TarError, OSError, EOFError) as error:
        rejects.add(unit.uri, RejectReason.CORRUPT_TAR, f"{type(error).__name__}: {error}")
    table = inputs.table()
    if table.num_rows == 0 and not rejects.rows["source"]:
        rejects.add(unit.uri, RejectReason.EMPTY_CLASS, "class tar holds no image")
    return Listed(table, rejects.table())


def _list_tar_member(uri: str, member: tarfile.TarInfo, inputs: _InputBuilder, rejects: _RejectBuilder) -> None:
    name = member.name
    source = f"{uri}#{name}"
    parts = name.replace("\\", "/").split("/")
    if member.isdir():
        return
    if not member.isfile() or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        if member.issym() or member.islnk():
            kind = "link"
        elif not member.isfile():
            kind = "device or special file"
        else:
            kind = "path"
        rejects.add(source, RejectReason.UNSAFE_TAR_MEMBER, f"unsafe {kind}: never read")
        return
    base = parts[-1]
    if _is_image_name(base) and not base.startswith("."):
        inputs.add(uri, name, member.offset_data, member.size, base)
    else:
        rejects.add(source, RejectReason.STRAY_FILE, "not an image file name")


def _list_file(unit: ListingUnit) -> Listed:
    loc = Location(unit.uri)
    filesystem, path = loc.resolve()
    with filesystem.open_input_file(path) as handle:
        table = pq.read_table(handle) if path.endswith(".parquet") else pacsv.read_csv(handle)
    column = "path" if "path" in table.column_names else "uri" if "uri" in table.column_names else None
    if column is None or "label" not in table.column_names:
        raise ValueError(f"list file {unit.uri}: needs a 'path' (or 'uri') column and a 'label' column")
    base = posixpath.dirname(loc.uri.split("?", 1)[0])
    paths = pc.cast(table.column(column), pa.string())
    absolute = pc.or_(pc.starts_with(paths, "/"), pc.match_substring(paths, "://"))
    sources = pc.if_else(absolute, paths, pc.binary_join_element_wise(base, paths, "/"))
    count = table.num_rows
    if "split" in table.column_names:
        splits = pc.cast(table.column("split"), pa.string())
        unknown = pc.unique(pc.filter(splits, pc.invert(pc.is_in(splits, pa.array(SPLIT_FOLDERS))))).to_pylist()
        if unknown:
            raise ValueError(f"list file {unit.uri}: split must be one of {SPLIT_FOLDERS}, found {unknown[:5]}")
    else:
        splits = pa.nulls(count, pa.string())
    columns = {
        "source": sources,
        "member": pa.nulls(count, pa.string()),
        "offset": pa.array([-1] * count, pa.int64()),
        "size": pa.array([-1] * count, pa.int64()),
        "name": pc.replace_substring_regex(paths, r"^.*/", ""),
        "class": pc.cast(table.column("label"), pa.string()),
        "split": splits,
    }
    return Listed(pa.table(columns, schema=INPUTS_SCHEMA), _RejectBuilder().table())
