"""Sources → one Arrow table of inputs (+ a table of structural rejects). I/O, no scheduling.

Layouts (``--layout``, detected by default):
* ``imagefolder``: ROOT/CLASS/…/IMAGE (one folder per class), optionally ROOT/{train,val}/CLASS/….
* ``class-tars``: ROOT/CLASS.tar holding the class's images (the ImageNet-21K release); members are
  located by offset and read in place later, never extracted. Links, devices, absolute names and
  names with ``..`` are never followed: they become ``unsafe_tar_member`` rejects.
* ``webdataset``: ROOT/*.tar (or the .tar files given) as WebDataset writes them, e.g. img2dataset's
  output: samples of adjacent members ``KEY.jpg`` + ``KEY.cls`` / ``KEY.json`` / ``KEY.txt``. The image
  member is read in place like a class tar's; the label is the ``.cls`` member, or the JSON field named
  by ``--label-field``. Told apart from class tars by a look at the first tar: a key with several
  members is a WebDataset sample (a class tar holds one file per name).
* ``list``: a CSV or Parquet file with a ``path`` (or ``uri``) column and a ``label`` column (class
  name), optionally ``split``; relative paths are relative to the list file.

Listing is split into units (a class folder, a tar, a list file) so that the distributor lists a
19,000-tar corpus in parallel on the workers. A tar is listed by streaming it once in 64 MB reads
(on object storage: one request to open it and one per 64 MB, never one per member). A list file is
read in batches straight into the compact ``INPUTS_SCHEMA`` (no Python object per row).
Every entry under a source root ends up an input or a reject: local trees are walked by ``walk``
(links, loops, FIFOs and devices), and ``combine`` keeps a file reached through links once.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
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

LAYOUTS = ("auto", "imagefolder", "class-tars", "webdataset", "list")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
SPLIT_FOLDERS = ("train", "val")
STREAM_BLOCK = 64 * 2**20  # one object-storage request per 64 MB of a streamed tar
PEEK_BLOCK = 2**20  # enough of a tar's head to tell WebDataset samples from a class's images
PEEK_MEMBERS = 32
_LISTING_GROUP = 512  # listed units whose tables are combined into one chunk
MAX_LABEL_MEMBER = 2**20  # a .cls or .json member larger than this holds no usable label
_LIST_BATCH_ROWS = 1 << 20
_CSV_BLOCK = 1 << 20
_PLAIN_INPUTS = pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type)
                           for f in INPUTS_SCHEMA])  # what a unit's rows are gathered in, before encoding
LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet")
LINKS_SCHEMA = pa.schema([("source", pa.string()), ("target", pa.string())])  # an entry reached through links


@dataclass(frozen=True)
class ListingUnit:
    """One piece of listing work: a class folder, a class tar, a WebDataset shard ("shard") or a list file."""

    kind: str  # "folder" | "tar" | "shard" | "list"
    uri: str
    class_name: str | None
    split: str | None
    label_field: str | None = None  # WebDataset shards: the JSON field holding the label (None: the .cls member)
    root: str | None = None  # the --src folder it lies in: links may not lead out of it


@dataclass
class Listed:
    inputs: pa.Table
    rejects: pa.Table
    links: pa.Table = field(default_factory=LINKS_SCHEMA.empty_table)  # entries reached through links


def plan_units(sources: list[str], layout: str, label_field: str | None = None
               ) -> tuple[list[ListingUnit], pa.Table]:
    """The listing units of every source, and the stray entries found at the top levels."""
    units: list[ListingUnit] = []
    rejects = _RejectBuilder()
    for source in sources:
        loc = Location(source)
        kind = _source_kind(loc)
        if kind == "file":
            units.append(_file_unit(source, layout, label_field))
            continue
        tree = None if is_remote(source) else SourceTree(source)
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
            kind = layout if layout != "auto" else _detect(root, root_entries)
            if kind == "webdataset":
                _check_labels(root, root_entries, label_field)
            for entry in root_entries:
                name = posixpath.basename(entry.path)
                child = root.join(name)
                is_tar = not entry.is_dir and name.endswith(".tar")
                if entry.reason:
                    rejects.add(child.uri, entry.reason, entry.detail)
                elif kind == "class-tars" and is_tar:
                    units.append(ListingUnit("tar", child.uri, name[: -len(".tar")], split))
                elif kind == "webdataset" and is_tar:
                    units.append(ListingUnit("shard", child.uri, None, split, label_field=label_field))
                elif kind == "imagefolder" and entry.is_dir:
                    units.append(ListingUnit("folder", child.uri, name, split, root=source))
                else:
                    what = {"class-tars": "class tar", "webdataset": "WebDataset shard (.tar)"}.get(kind,
                                                                                                  "class folder")
                    rejects.add(child.uri, RejectReason.STRAY_FILE, f"not a {what}")
    return units, rejects.table()


def _file_unit(source: str, layout: str, label_field: str | None) -> ListingUnit:
    """A file given as --src: a list file, or one tar (a WebDataset shard, or one class's tar)."""
    name = posixpath.basename(Location(source).path)
    if _is_image_name(name) and not name.lower().endswith(LIST_SUFFIXES):
        raise ValueError(f"--src {source} is an image; give the folder that holds the class folders (or "
                         "class tars), or a CSV/Parquet list of images")
    if layout in ("auto", "list") and not name.endswith(".tar"):
        return ListingUnit("list", source, None, None)
    if not name.endswith(".tar") or layout in ("imagefolder", "list"):
        raise ValueError(f"--src {source} is a file; --layout {layout} takes a folder "
                         "(list files and .tar files are given as files)")
    if layout == "webdataset" or (layout == "auto" and _looks_like_webdataset(source)):
        _check_labels(Location(source), None, label_field)
        return ListingUnit("shard", source, None, None, label_field)
    return ListingUnit("tar", source, name[: -len(".tar")], None)


def _detect(root: Location, entries: list[Entry]) -> str:
    tars = [e for e in entries if not e.is_dir and not e.reason and e.path.endswith(".tar")]
    folders = sum(1 for e in entries if e.is_dir and not e.reason)
    if len(tars) <= folders:
        return "imagefolder"
    first = root.join(posixpath.basename(tars[0].path)).uri
    return "webdataset" if _looks_like_webdataset(first) else "class-tars"


def _looks_like_webdataset(uri: str) -> bool:
    """Whether the first members of this tar form WebDataset samples: a key with more than one member."""
    return any(len(extensions) > 1 for extensions in _peek_samples(uri).values())


def _peek_samples(uri: str) -> dict[str, set[str]]:
    """Key → member extensions of the first few members (empty when the tar cannot be read)."""
    samples: dict[str, set[str]] = {}
    try:
        with _tar_stream(uri, PEEK_BLOCK) as archive:
            for count, member in enumerate(archive):
                if count == PEEK_MEMBERS:
                    break
                if member.isfile():
                    key, extension = webdataset_key(member.name)
                    samples.setdefault(key, set()).add(extension)
    except (tarfile.TarError, OSError, EOFError):
        return {}
    return samples


def _check_labels(root: Location, entries: list[Entry] | None, label_field: str | None) -> None:
    """Without --label-field the samples must carry a .cls member: say so before any work starts."""
    if label_field is not None:
        return
    first = root.uri
    if entries is not None:
        tars = [e for e in entries if not e.is_dir and not e.reason and e.path.endswith(".tar")]
        if not tars:
            return
        first = root.join(posixpath.basename(tars[0].path)).uri
    extensions = set().union(*_peek_samples(first).values())
    if extensions and "cls" not in extensions:
        found = ", ".join(sorted(extensions))
        raise ValueError(f"WebDataset shards under {root.uri} have no .cls member (samples hold {found}): name the "
                         "JSON field that holds each sample's label with --label-field")


def webdataset_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key ends at the first dot of the member's base name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


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


def _list_dir(filesystem: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=recursive))
    return sorted(infos, key=lambda info: info.path)


def list_unit(unit: ListingUnit) -> Listed:
    """List one unit into rows of ``INPUTS_SCHEMA`` and ``REJECTS_SCHEMA``."""
    if unit.kind == "folder":
        return _list_folder(unit)
    if unit.kind == "tar":
        return _list_tar(unit)
    if unit.kind == "shard":
        return _list_shard(unit)
    return _list_file(unit)


def source_uris(inputs: pa.Table) -> pa.ChunkedArray:
    """One URI per listed row: the file's URI, or ``TAR_URI#MEMBER`` for a tar member."""
    source, member = sources_and_members(inputs)
    joined = pc.binary_join_element_wise(source, member, "#")
    return pc.coalesce(joined, source)


def sources_and_members(inputs: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The manifest's ``source`` and ``member`` of listed rows: a file's URI and null, or the tar's URI and the
    member's name. A file's URI is its folder's with the name inserted before any ``?query`` of an object URI."""
    parent = inputs.column("parent")
    entry = inputs.column("entry")
    is_member = pc.greater_equal(inputs.column("offset"), 0)
    file_uris = pa.chunked_array(
        [_join_files(chunk, entries) for chunk, entries in zip(parent.chunks, _aligned(entry, parent), strict=True)],
        pa.string())
    source = pc.if_else(is_member, pc.cast(parent, pa.string()), file_uris)
    member = pc.if_else(is_member, entry, pa.scalar(None, pa.string()))
    return source, member


def _aligned(column: pa.ChunkedArray, like: pa.ChunkedArray) -> list[pa.Array]:
    """``column`` cut into the chunk lengths of ``like``."""
    pieces, start = [], 0
    for chunk in like.chunks:
        pieces.append(column.slice(start, len(chunk)).combine_chunks())
        start += len(chunk)
    return pieces


def _join_files(parents: pa.DictionaryArray, entries: pa.Array) -> pa.Array:
    folders = parents.dictionary  # one per folder, not per input
    remote = pc.match_substring(folders, "://")
    parts = pc.extract_regex(folders, r"^(?P<base>[^?]*)(?P<query>.*)$")
    base = pc.if_else(remote, parts.field("base"), folders)
    query = pc.if_else(remote, parts.field("query"), "")
    prefix = pa.DictionaryArray.from_arrays(parents.indices, pc.binary_join_element_wise(base, "/", ""))
    suffix = pa.DictionaryArray.from_arrays(parents.indices, query)
    return pc.binary_join_element_wise(pc.cast(prefix, pa.string()), entries, pc.cast(suffix, pa.string()), "")


def combine(listed: list[Listed], top_rejects: pa.Table) -> tuple[pa.Table, pa.Table]:
    """All units' inputs and rejects in one table each, every entry once.

    Thousands of small per-unit tables become a few chunks with one dictionary per column (a list
    file's table stays as it is: no copy). An entry reached through links (``Listed.links``) that is
    also listed under its own path, or through an earlier link (by source order), becomes a
    ``duplicate_input`` reject: the same image under two keys would sit in two shards, perhaps in
    train and val, perhaps under two labels.
    """
    groups = [listed[i : i + _LISTING_GROUP] for i in range(0, len(listed), _LISTING_GROUP)]
    inputs = pa.concat_tables(
        [group[0].inputs if len(group) == 1 else
         pa.concat_tables([item.inputs for item in group]).unify_dictionaries().combine_chunks() for group in groups]
    ).unify_dictionaries() if groups else INPUTS_SCHEMA.empty_table()
    rejects = pa.concat_tables([top_rejects, *[item.rejects for item in listed]])
    links = pa.concat_tables([item.links for item in listed]) if listed else LINKS_SCHEMA.empty_table()
    if links.num_rows == 0:
        return inputs, rejects
    sources = source_uris(inputs)
    every = pa.chunked_array(sources.chunks + rejects.column("source").chunks, pa.string())
    direct = pc.filter(every, pc.invert(pc.is_in(every, value_set=links.column("source"))))
    seen = set(pc.filter(direct, pc.is_in(direct, value_set=links.column("target"))).to_pylist())
    duplicates = _RejectBuilder()
    for row in links.sort_by("source").to_pylist():
        if row["target"] in seen:
            duplicates.add(row["source"], RejectReason.DUPLICATE_INPUT, f"the same as {row['target']}")
        seen.add(row["target"])
    dropped = duplicates.table()
    keep = [pc.invert(pc.is_in(column, value_set=dropped.column("source")))
            for column in (sources, rejects.column("source"))]
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
    """Rows of one unit (a class folder or a tar: thousands of rows, not millions)."""

    def __init__(self, class_name: str | None, split: str | None) -> None:
        self.class_name = class_name
        self.split = split
        self.rows: dict[str, list] = {name: [] for name in INPUTS_SCHEMA.names}

    def add(self, parent: str, entry: str, offset: int, size: int, class_name: str | None = None) -> None:
        row = self.rows
        row["parent"].append(parent)
        row["entry"].append(entry)
        row["offset"].append(offset)
        row["size"].append(size)
        row["class"].append(class_name if class_name is not None else self.class_name)
        row["split"].append(self.split)

    def table(self) -> pa.Table:
        return _encoded(pa.table(self.rows, schema=_PLAIN_INPUTS))


def _encoded(table: pa.Table) -> pa.Table:
    """``table`` with plain string columns where INPUTS_SCHEMA wants dictionaries, dictionary-encoded."""
    columns = []
    for spec in INPUTS_SCHEMA:
        column = table.column(spec.name)
        if pa.types.is_dictionary(spec.type) and not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(pc.cast(column, pa.string()))
        columns.append(pc.cast(column, spec.type))
    return pa.table(columns, schema=INPUTS_SCHEMA)


def _is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_folder(unit: ListingUnit) -> Listed:
    inputs, rejects = _InputBuilder(unit.class_name, unit.split), _RejectBuilder()
    links = {"source": [], "target": []}
    for entry, parent, name in _folder_files(unit):
        if entry.reason:
            rejects.add(entry.path, entry.reason, entry.detail)
        elif _is_image_name(name) and not name.startswith("."):
            inputs.add(parent, name, -1, entry.size)
        else:
            rejects.add(entry.path, RejectReason.STRAY_FILE, "not an image file name")
        if entry.target:
            links["source"].append(entry.path)
            links["target"].append(entry.target)
    table = inputs.table()
    if table.num_rows == 0:
        rejects.add(unit.uri, RejectReason.EMPTY_CLASS, "class folder holds no image")
    return Listed(table, rejects.table(), pa.table(links, schema=LINKS_SCHEMA))


def _folder_files(unit: ListingUnit) -> Iterator[tuple[Entry, str, str]]:
    """Every file and rejected entry below a class folder (its full path or URI), with its folder's URI and
    its name: what the compact input table stores."""
    loc = Location(unit.uri)
    if not is_remote(unit.uri):
        for entry in SourceTree(unit.root or posixpath.dirname(unit.uri)).walk(unit.uri):
            folder, name = posixpath.split(entry.path)
            yield entry, folder, name
        return
    filesystem, path = loc.resolve()
    for info in _list_dir(filesystem, path, recursive=True):
        if info.type == pafs.FileType.File:
            relative = posixpath.relpath(info.path, path)
            folder, name = posixpath.split(relative)
            yield (Entry(loc.join(relative).uri, size=info.size), loc.join(folder).uri if folder else loc.uri,
                   name)


@contextlib.contextmanager
def _tar_stream(uri: str, block: int = STREAM_BLOCK) -> Iterator[tarfile.TarFile]:
    """A tar read front to back in ``block``-sized reads (one ranged GET each on object storage)."""
    filesystem, path = Location(uri).resolve()
    with filesystem.open_input_stream(path, compression=None, buffer_size=block) as handle, \
            tarfile.open(fileobj=handle, mode="r|", bufsize=PEEK_BLOCK) as archive:
        yield archive


def _list_tar(unit: ListingUnit) -> Listed:
    inputs, rejects = _InputBuilder(unit.class_name, unit.split), _RejectBuilder()
    try:
        with _tar_stream(unit.uri) as archive:
            for member in archive:
                if not _safe_member(unit.uri, member, rejects):
                    continue
                base = posixpath.basename(member.name)
                if _is_image_name(base) and not base.startswith("."):
                    inputs.add(unit.uri, member.name, member.offset_data, member.size)
                else:
                    rejects.add(f"{unit.uri}#{member.name}", RejectReason.STRAY_FILE, "not an image file name")
    except (tarfile.TarError, OSError, EOFError) as error:
        rejects.add(unit.uri, RejectReason.CORRUPT_TAR, f"{type(error).__name__}: {error}")
    table = inputs.table()
    if table.num_rows == 0 and not rejects.rows["source"]:
        rejects.add(unit.uri, RejectReason.EMPTY_CLASS, "class tar holds no image")
    return Listed(table, rejects.table())


def _safe_member(uri: str, member: tarfile.TarInfo, rejects: _RejectBuilder) -> bool:
    """Regular files with relative names inside the tar; anything else is recorded and never read."""
    name = member.name
    parts = name.replace("\\", "/").split("/")
    if member.isdir():
        return False
    if not member.isfile() or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        if member.issym() or member.islnk():
            kind = "link"
        elif not member.isfile():
            kind = "device or special file"
        else:
            kind = "path"
        rejects.add(f"{uri}#{name}", RejectReason.UNSAFE_TAR_MEMBER, f"unsafe {kind}: never read")
        return False
    return True


def _list_shard(unit: ListingUnit) -> Listed:
    """A WebDataset shard: one input per sample (its image member, read in place later), labelled."""
    inputs, rejects = _InputBuilder(None, unit.split), _RejectBuilder()
    sample: list[tuple[tarfile.TarInfo, str, bytes | None]] = []
    key = None
    try:
        with _tar_stream(unit.uri) as archive:
            for member in archive:
                if not _safe_member(unit.uri, member, rejects):
                    continue
                member_key, extension = webdataset_key(member.name)
                if member_key != key:
                    _add_sample(unit, key, sample, inputs, rejects)
                    key, sample = member_key, []
                wanted = extension == "cls" if unit.label_field is None else extension == "json"
                data = None
                if wanted and member.size <= MAX_LABEL_MEMBER:
                    data = archive.extractfile(member).read()
                sample.append((member, extension, data))
            _add_sample(unit, key, sample, inputs, rejects)
    except (tarfile.TarError, OSError, EOFError) as error:
        rejects.add(unit.uri, RejectReason.CORRUPT_TAR, f"{type(error).__name__}: {error}")
    return Listed(inputs.table(), rejects.table())


def _add_sample(unit: ListingUnit, key: str | None, members: list[tuple[tarfile.TarInfo, str, bytes | None]],
                inputs: _InputBuilder, rejects: _RejectBuilder) -> None:
    if key is None:
        return
    images = [member for member, extension, _ in members if "." + extension in IMAGE_EXTENSIONS]
    if not images:
        rejects.add(f"{unit.uri}#{members[0][0].name}", RejectReason.STRAY_FILE, f"sample {key} has no image member")
        return
    label = _sample_label(members, unit.label_field)
    if label is None:
        where = f"JSON field {unit.label_field!r}" if unit.label_field else ".cls member"
        rejects.add(f"{unit.uri}#{images[0].name}", RejectReason.NO_LABEL, f"sample {key} has no usable {where}")
        return
    inputs.add(unit.uri, images[0].name, images[0].offset_data, images[0].size, class_name=label)


def _sample_label(members: list[tuple[tarfile.TarInfo, str, bytes | None]], field: str | None) -> str | None:
    for _, extension, data in members:
        if data is None:
            continue
        try:
            if field is None:
                return str(int(data.decode("ascii").strip()))
            value = json.loads(data).get(field) if extension == "json" else None
        except (ValueError, UnicodeDecodeError, AttributeError):
            return None
        if value is None or isinstance(value, (dict, list)) or str(value) == "":
            return None
        return str(value)
    return None


class _BlankCells:
    """Rows without a path or a label cannot be listed: counted over every batch, then the list is refused
    with one line naming the first such row."""

    def __init__(self) -> None:
        self.found: dict[str, list[int]] = {}  # column → [blank rows, first blank data row]

    def count(self, table: pa.Table, first_row: int) -> None:
        for name in table.column_names[:2]:  # path (or uri), label
            text = pc.utf8_trim_whitespace(pc.cast(table.column(name), pa.string()))
            blank = pc.fill_null(pc.equal(text, ""), True)
            count = pc.sum(blank).as_py() or 0
            if count:
                seen = self.found.setdefault(name, [0, first_row + pc.index(blank, True).as_py() + 1])
                seen[0] += count

    def refuse(self, uri: str) -> None:
        for name, (count, row) in sorted(self.found.items(), key=lambda item: item[0] == "label"):
            raise ValueError(f"list file {uri}: {count} row(s) with a blank '{name}' (the first is data row "
                             f"{row}); give every row a {name}")


def _list_file(unit: ListingUnit) -> Listed:
    """A CSV or Parquet list, read in batches straight into the compact input table."""
    loc = Location(unit.uri)
    filesystem, path = loc.resolve()
    base = posixpath.dirname(loc.path)
    parts, blank, rows = [], _BlankCells(), 0
    try:
        for batch in _list_batches(filesystem, path, unit.uri):
            blank.count(batch, rows)
            rows += batch.num_rows
            if not blank.found:
                parts.append(_list_rows(batch, base, unit.uri))
    except pa.ArrowInvalid as error:
        kind = "Parquet" if path.endswith(".parquet") else "CSV"
        raise ValueError(f"list file {unit.uri}: not a {kind} list of images ({_first_words(error)})") from None
    blank.refuse(unit.uri)
    inputs = pa.concat_tables(parts).unify_dictionaries() if parts else INPUTS_SCHEMA.empty_table()
    return Listed(inputs, _RejectBuilder().table())


def _list_batches(filesystem: pafs.FileSystem, path: str, uri: str) -> Iterator[pa.Table]:
    """The list's path, label (and split) columns as strings, in tables of about a million rows."""
    with filesystem.open_input_file(path) as handle:
        if path.endswith(".parquet"):
            parquet = pq.ParquetFile(handle)
            columns = _list_columns(parquet.schema_arrow.names, uri)
            for batch in parquet.iter_batches(batch_size=_LIST_BATCH_ROWS, columns=columns):
                yield pa.Table.from_batches([batch])
            return
        names = pacsv.open_csv(handle, read_options=pacsv.ReadOptions(block_size=1 << 20)).schema.names
    columns = _list_columns(names, uri)
    # Small blocks parsed on this thread: the CSV reader's larger or threaded blocks leave ~50-80 bytes per
    # row of freed memory that the process keeps (measured at 3 M rows: +250 MB against +90 MB).
    options = pacsv.ReadOptions(block_size=_CSV_BLOCK, use_threads=False)
    with filesystem.open_input_file(path) as handle:
        reader = pacsv.open_csv(handle, read_options=options, convert_options=pacsv.ConvertOptions(
            include_columns=columns, column_types=dict.fromkeys(columns, pa.string())))
        batches, rows = [], 0
        for batch in reader:
            batches.append(batch)
            rows += batch.num_rows
            if rows >= _LIST_BATCH_ROWS:
                yield pa.Table.from_batches(batches)
                batches, rows = [], 0
        if batches:
            yield pa.Table.from_batches(batches)


def _list_columns(names: list[str], uri: str) -> list[str]:
    path = "path" if "path" in names else "uri" if "uri" in names else None
    if path is None or "label" not in names:
        raise ValueError(f"list file {uri}: needs a 'path' (or 'uri') column and a 'label' column")
    return [path, "label"] + (["split"] if "split" in names else [])


def _list_rows(batch: pa.Table, base: str, uri: str) -> pa.Table:
    batch = batch.combine_chunks()
    paths = pc.cast(batch.column(0).chunk(0) if batch.num_rows else pa.array([], pa.string()), pa.string())
    labels = pc.cast(batch.column(1).chunk(0) if batch.num_rows else pa.array([], pa.string()), pa.string())
    count = batch.num_rows
    if batch.num_columns > 2:
        splits = pc.cast(batch.column(2).combine_chunks(), pa.string())
        splits = pc.if_else(pc.equal(pc.utf8_trim_whitespace(splits), ""), pa.scalar(None, pa.string()), splits)
        unknown = pc.unique(pc.filter(splits, pc.invert(pc.is_in(splits, pa.array(SPLIT_FOLDERS))))).to_pylist()
        if [value for value in unknown if value is not None]:
            raise ValueError(f"list file {uri}: split must be one of {SPLIT_FOLDERS} (or empty), found {unknown[:5]}")
    else:
        splits = pa.nulls(count, pa.string())
    absolute = pc.or_(pc.starts_with(paths, "/"), pc.match_substring_regex(paths, SCHEME_PATTERN))
    if pc.all(absolute).as_py() is not True:
        paths = pc.if_else(absolute, paths, pc.binary_join_element_wise(base, paths, "/"))
    parts = pc.extract_regex(paths, r"^(?P<parent>.*)/(?P<entry>[^/]*)$")
    parent = pc.fill_null(parts.field("parent"), "")
    entry = pc.coalesce(parts.field("entry"), paths)
    unknown_size = pa.repeat(pa.scalar(-1, pa.int64()), count)
    return _encoded(pa.table({"parent": parent, "entry": entry, "offset": unknown_size, "size": unknown_size,
                              "class": labels, "split": splits}))


def _first_words(error: Exception, limit: int = 120) -> str:
    """The start of an error's first line, printable: a parser's message may quote the file's raw bytes."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = re.sub(r"[^\x20-\x7e]", "?", line)
    return line if len(line) <= limit else line[:limit] + "…"
