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
Every entry under a source root ends up an input or a reject: local trees are walked by ``walk``
(links, loops, FIFOs and devices), and ``combine`` keeps a file reached through links once.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tarfile
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from subspectral.schemas.reasons import RejectReason
from subspectral.schemas.tables import INPUTS_SCHEMA, REJECTS_SCHEMA

from .storage import SCHEME_PATTERN, Location, is_remote
from .walk import Entry, SourceTree, special_kind

LAYOUTS = ("auto", "imagefolder", "class-tars", "list")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
SPLIT_FOLDERS = ("train", "val")
LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet")
LINKS_SCHEMA = pa.schema([("source", pa.string()), ("target", pa.string())])  # an entry reached through links


@dataclass(frozen=True)
class ListingUnit:
    """One piece of listing work: a class folder, a class tar, or a list file."""

    kind: str  # "folder" | "tar" | "list"
    uri: str
    class_name: str | None
    split: str | None
    root: str | None = None  # the --src folder it lies in: links may not lead out of it


@dataclass
class Listed:
    inputs: pa.Table
    rejects: pa.Table
    links: pa.Table = field(default_factory=LINKS_SCHEMA.empty_table)  # entries reached through links


def plan_units(sources: list[str], layout: str) -> tuple[list[ListingUnit], pa.Table]:
    """The listing units of every source, and the stray entries found at the top levels."""
    units: list[ListingUnit] = []
    rejects = _RejectBuilder()
    for source in sources:
        loc = Location(source)
        tree = None if is_remote(source) else SourceTree(source)
        kind = _source_kind(loc)
        if kind == "file":
            if layout not in ("auto", "list"):
                raise ValueError(f"--src {source} is a file; only --layout list takes a file")
            if _is_image_name(loc.path) and not loc.path.lower().endswith(LIST_SUFFIXES):
                raise ValueError(f"--src {source} is an image; give the folder that holds the class folders (or "
                                 "class tars), or a CSV/Parquet list of images")
            units.append(ListingUnit("list", source, None, None))
            continue
        entries = _entries(loc, tree)
        names = {posixpath.basename(e.path): e for e in entries}
        split_roots = [n for n in SPLIT_FOLDERS if n in names and names[n].is_dir and not names[n].reason]
        roots = [(loc.join(n), n) for n in split_roots] if split_roots else [(loc, None)]
        if split_roots:
            for name, entry in names.items():
                if name not in split_roots:
                    rejects.add(loc.join(name).uri, entry.reason or RejectReason.STRAY_FILE,
                                entry.detail or "not a split folder next to train/ and val/")
        for root, split in roots:
            root_entries = entries if split is None else _entries(root, tree)
            kind = layout if layout != "auto" else _detect(root_entries)
            for entry in root_entries:
                name = posixpath.basename(entry.path)
                child = root.join(name)
                if entry.reason:
                    rejects.add(child.uri, entry.reason, entry.detail)
                elif kind == "class-tars" and not entry.is_dir and name.endswith(".tar"):
                    units.append(ListingUnit("tar", child.uri, name[: -len(".tar")], split))
                elif kind == "imagefolder" and entry.is_dir:
                    units.append(ListingUnit("folder", child.uri, name, split, source))
                else:
                    expected = "tar" if kind == "class-tars" else "folder"
                    rejects.add(child.uri, RejectReason.STRAY_FILE, f"not a class {expected}")
    return units, rejects.table()


def _source_kind(loc: Location) -> str:
    """"file" or "folder"; anything else is refused with one line (a FIFO would block the listing)."""
    if not is_remote(loc.uri):
        try:
            mode = os.stat(loc.uri).st_mode
        except FileNotFoundError:
            raise ValueError(f"--src {loc.uri}: no such file or folder") from None
        if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
            return "folder" if stat.S_ISDIR(mode) else "file"
        raise ValueError(f"--src {loc.uri} is a {special_kind(mode)}, not a file or folder")
    filesystem, path = loc.resolve()
    try:
        info = filesystem.get_file_info(path)
    except OSError as error:  # the store is unreachable, or refuses: say which --src
        raise OSError(f"--src {loc.uri}: {error}") from None
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"--src {loc.uri}: no such file or folder")
    return "file" if info.type == pafs.FileType.File else "folder"


def _entries(loc: Location, tree: SourceTree | None) -> list[Entry]:
    """One folder's entries: a local one through ``walk`` (links and special files judged), else pyarrow's."""
    if tree is not None:
        return tree.scan(loc.uri)
    filesystem, path = loc.resolve()
    return [Entry(info.path, is_dir=info.type == pafs.FileType.Directory, size=info.size or -1)
            for info in _list_dir(filesystem, path)]


def _detect(entries: list[Entry]) -> str:
    tars = sum(1 for e in entries if not e.is_dir and not e.reason and e.path.endswith(".tar"))
    folders = sum(1 for e in entries if e.is_dir and not e.reason)
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


def combine(listed: list[Listed], top_rejects: pa.Table) -> tuple[pa.Table, pa.Table]:
    """All units' inputs and rejects in one table each, every entry once.

    An entry reached through links (``Listed.links``) that is also listed under its own path, or
    through an earlier link (by source order), becomes a ``duplicate_input`` reject: the same image
    under two keys would sit in two shards, perhaps in train and val, perhaps under two labels.
    """
    inputs = pa.concat_tables([item.inputs for item in listed]) if listed else INPUTS_SCHEMA.empty_table()
    rejects = pa.concat_tables([top_rejects, *[item.rejects for item in listed]])
    links = pa.concat_tables([item.links for item in listed]) if listed else LINKS_SCHEMA.empty_table()
    if links.num_rows == 0:
        return inputs, rejects
    every = pa.chunked_array(inputs.column("source").chunks + rejects.column("source").chunks, pa.string())
    direct = pc.filter(every, pc.invert(pc.is_in(every, value_set=links.column("source"))))
    seen = set(pc.filter(direct, pc.is_in(direct, value_set=links.column("target"))).to_pylist())
    duplicates = _RejectBuilder()
    for row in links.sort_by("source").to_pylist():
        if row["target"] in seen:
            duplicates.add(row["source"], RejectReason.DUPLICATE_INPUT, f"the same as {row['target']}")
        seen.add(row["target"])
    dropped = duplicates.table()
    keep = [pc.invert(pc.is_in(table.column("source"), value_set=dropped.column("source")))
            for table in (inputs, rejects)]
    return inputs.filter(keep[0]), pa.concat_tables([rejects.filter(keep[1]), dropped])


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
    inputs, rejects = _InputBuilder(unit.class_name, unit.split), _RejectBuilder()
    links = {"source": [], "target": []}
    for entry in _folder_files(unit):
        name = posixpath.basename(entry.path)
        if entry.reason:
            rejects.add(entry.path, entry.reason, entry.detail)
        elif _is_image_name(name) and not name.startswith("."):
            inputs.add(entry.path, None, -1, entry.size, name)
        else:
            rejects.add(entry.path, RejectReason.STRAY_FILE, "not an image file name")
        if entry.target:
            links["source"].append(entry.path)
            links["target"].append(entry.target)
    table = inputs.table()
    if table.num_rows == 0:
        rejects.add(unit.uri, RejectReason.EMPTY_CLASS, "class folder holds no image")
    return Listed(table, rejects.table(), pa.table(links, schema=LINKS_SCHEMA))


def _folder_files(unit: ListingUnit) -> list[Entry]:
    """Every file and rejected entry below a class folder, with its full path (or URI)."""
    loc = Location(unit.uri)
    if not is_remote(unit.uri):
        return list(SourceTree(unit.root or posixpath.dirname(unit.uri)).walk(unit.uri))
    filesystem, path = loc.resolve()
    return [Entry(loc.join(posixpath.relpath(info.path, path)).uri, size=info.size)
            for info in _list_dir(filesystem, path, recursive=True) if info.type == pafs.FileType.File]


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


def _refuse_blank_cells(uri: str, table: pa.Table, columns: tuple[str, ...]) -> None:
    """A row without a path or a label cannot be listed: refuse the list, naming the first such row."""
    for name in columns:
        text = pc.utf8_trim_whitespace(pc.cast(table.column(name), pa.string()))
        blank = pc.fill_null(pc.equal(text, ""), True)
        count = pc.sum(blank).as_py() or 0
        if count:
            row = pc.index(blank, True).as_py()
            raise ValueError(f"list file {uri}: {count} row(s) with a blank '{name}' (the first is data row "
                             f"{row + 1}); give every row a {name}")


def _list_file(unit: ListingUnit) -> Listed:
    loc = Location(unit.uri)
    filesystem, path = loc.resolve()
    parquet = path.endswith(".parquet")
    try:
        with filesystem.open_input_file(path) as handle:
            table = pq.read_table(handle) if parquet else pacsv.read_csv(handle)
    except pa.ArrowInvalid as error:
        raise ValueError(f"list file {unit.uri}: not a {'Parquet' if parquet else 'CSV'} list of images "
                         f"({_first_words(error)})") from None
    column = "path" if "path" in table.column_names else "uri" if "uri" in table.column_names else None
    if column is None or "label" not in table.column_names:
        raise ValueError(f"list file {unit.uri}: needs a 'path' (or 'uri') column and a 'label' column")
    _refuse_blank_cells(unit.uri, table, (column, "label"))
    base = posixpath.dirname(loc.path)
    paths = pc.cast(table.column(column), pa.string())
    absolute = pc.or_(pc.starts_with(paths, "/"), pc.match_substring_regex(paths, SCHEME_PATTERN))
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


def _first_words(error: Exception, limit: int = 120) -> str:
    """The start of an error's first line, printable: a parser's message may quote the file's raw bytes."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = re.sub(r"[^\x20-\x7e]", "?", line)
    return line if len(line) <= limit else line[:limit] + "…"
