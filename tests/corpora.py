"""Small real corpora on disk for the prepare tests: good images plus every kind of bad input."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from conftest import encode, photo_like
from PIL import Image

GOOD_PER_CLASS = 6


def jpeg(seed: int, width: int = 160, height: int = 120) -> bytes:
    return encode(photo_like(width, height, seed=seed), quality=90)


def image_folder(root: Path, classes: tuple[str, ...] = ("n001", "n002", "n003")) -> Path:
    """Good images only: ``GOOD_PER_CLASS`` per class, sizes varied."""
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(GOOD_PER_CLASS):
            (folder / f"{name}_{i}.JPEG").write_bytes(jpeg(100 * c + i, 120 + 17 * i, 100 + 11 * i))
    return root


# Bad inputs in an ImageFolder tree: relative path → expected reject reason (None: must be written).
FOLDER_QUIRKS: dict[str, str | None] = {
    "README.txt": "stray_file",
    "n001/notes.txt": "stray_file",
    "n001/.DS_Store": "stray_file",
    "n001/empty.JPEG": "empty_file",
    "n001/text.JPEG": "not_an_image",
    "n001/truncated.JPEG": "truncated",
    "n001/tiny.JPEG": "too_small",
    "n002/bomb.png": "too_large",
    "n002/fake.jpg": "unreadable",
    "n002/name.with.dots.JPEG": None,
    "n002/name with spaces.JPEG": None,
    "n002/nön-ascii_ß.JPEG": None,
    "n003/n001_0.JPEG": None,  # same stem as a file of class n001: both keys get a hash suffix
    "n003/rotated.JPEG": None,
    "n003/cmyk.JPEG": None,
    "n003/png-inside.JPEG": None,
}


def add_folder_quirks(root: Path) -> dict[str, str | None]:
    (root / "n004_empty_class").mkdir()
    payloads = {
        "README.txt": b"hello",
        "n001/notes.txt": b"notes",
        "n001/.DS_Store": b"\x00\x01",
        "n001/empty.JPEG": b"",
        "n001/text.JPEG": b"<html>not an image</html>",
        "n001/truncated.JPEG": jpeg(7, 300, 200)[:2500],
        "n001/tiny.JPEG": jpeg(8, 12, 12),
        "n002/bomb.png": encode(Image.new("1", (30_000, 30_000)), "PNG"),
        "n002/fake.jpg": b"\xff\xd8\xff\xe0garbage that is not a jpeg",
        "n002/name.with.dots.JPEG": jpeg(9),
        "n002/name with spaces.JPEG": jpeg(10),
        "n002/nön-ascii_ß.JPEG": jpeg(11),
        "n003/n001_0.JPEG": jpeg(12),
        "n003/rotated.JPEG": _rotated_jpeg(),
        "n003/cmyk.JPEG": encode(Image.fromarray(photo_like(150, 120, seed=13)).convert("CMYK"), quality=90),
        "n003/png-inside.JPEG": encode(photo_like(150, 120, seed=14), "PNG"),
    }
    for relative, data in payloads.items():
        (root / relative).write_bytes(data)
    return {**FOLDER_QUIRKS, "n004_empty_class": "empty_class"}


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo_like(160, 120, seed=15), quality=90, exif=exif.tobytes())


def class_tars(root: Path, classes: tuple[str, ...] = ("n001", "n002", "n003")) -> Path:
    """The ImageNet-21K release layout: ROOT/CLASS.tar holding that class's JPEGs."""
    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(classes):
        with tarfile.open(root / f"{name}.tar", "w") as archive:
            for i in range(GOOD_PER_CLASS):
                _add(archive, f"{name}_{i}.JPEG", jpeg(100 * c + i, 120 + 17 * i, 100 + 11 * i))
    return root


def _add(archive: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = link
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


# Malicious or broken tars: (tar name, member or None) → expected reason.
TAR_QUIRKS = {
    ("n005.tar", "evil-link.JPEG"): "unsafe_tar_member",
    ("n005.tar", "evil-hardlink.JPEG"): "unsafe_tar_member",
    ("n005.tar", "evil-device.JPEG"): "unsafe_tar_member",
    ("n005.tar", "/tmp/subspectral-evil-absolute.JPEG"): "unsafe_tar_member",
    ("n005.tar", "../subspectral-evil-parent.JPEG"): "unsafe_tar_member",
    ("n005.tar", "readme.txt"): "stray_file",
    ("n005.tar", "n005_bad.JPEG"): "truncated",
    ("n006.tar", None): "corrupt_tar",
    ("n007.tar", None): "empty_class",
    ("notes.txt", None): "stray_file",
}


def add_tar_quirks(root: Path) -> None:
    with tarfile.open(root / "n005.tar", "w") as archive:
        _add(archive, "n005_0.JPEG", jpeg(500))
        _add(archive, "n005_1.JPEG", jpeg(501))
        _add(archive, "evil-link.JPEG", b"", tarfile.SYMTYPE, "/etc/passwd")
        _add(archive, "evil-hardlink.JPEG", b"", tarfile.LNKTYPE, "n005_0.JPEG")
        _add(archive, "evil-device.JPEG", b"", tarfile.CHRTYPE)
        _add(archive, "/tmp/subspectral-evil-absolute.JPEG", jpeg(502))
        _add(archive, "../subspectral-evil-parent.JPEG", jpeg(503))
        _add(archive, "subdir", b"", tarfile.DIRTYPE)
        _add(archive, "readme.txt", b"text")
        _add(archive, "n005_bad.JPEG", jpeg(504, 300, 200)[:2000])
    good = (root / "n001.tar").read_bytes()
    (root / "n006.tar").write_bytes(good[:100] + b"\x13" * 50 + good[150:])  # first header's checksum broken
    with tarfile.open(root / "n007.tar", "w"):
        pass
    (root / "notes.txt").write_bytes(b"not a class tar")


def add_link_quirks(root: Path, outside: Path) -> dict[str, str]:
    """Links, loops and special files in a tree made by ``image_folder``: relative path → expected reason.

    Every real image stays listed once, under its own path; nothing here is opened, and nothing
    outside ``root`` (``outside`` holds an image and is linked to) is read.
    """
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "elsewhere.JPEG").write_bytes(jpeg(900))
    (root / "n001" / "sub").mkdir()
    links = {
        "n001/sub/up": "..",  # the loop: a tree of 18 files became 738 inputs
        "n001/self": ".",
        "n001/root": "..",  # the source root, which holds n001
        "n001/chain.JPEG": "chain.JPEG",  # a link to itself
        "n001/alias": "../n002",  # another class folder: its files are listed there already
        "n001/same.JPEG": "n001_0.JPEG",  # a file listed under its own name
        "n003/borrowed.JPEG": "../n001/n001_1.JPEG",  # ... in another class
        "n001/out.JPEG": str(outside / "elsewhere.JPEG"),
        "n002/outdir": str(outside),
        "n002/dangling.JPEG": "missing.JPEG",
        "n002/zero.JPEG": "/dev/zero",
        "n002/null.jpg": "/dev/null",
        "loop": ".",  # at the top level, among the class folders
        "gone": "nowhere",
        "elsewhere": str(outside),
    }
    for relative, target in links.items():
        (root / relative).symlink_to(target)
    os.mkfifo(root / "n003" / "pipe.JPEG")
    os.mkfifo(root / "fifo")
    loops = ("n001/sub/up", "n001/self", "n001/root", "n001/chain.JPEG", "loop")
    return {
        **dict.fromkeys(loops, "symlink_loop"),
        **dict.fromkeys(("n001/same.JPEG", "n003/borrowed.JPEG"), "duplicate_input"),
        # n002 seen again through n001/alias: its images and its bad entries alike
        **{f"n001/alias/{name}": "duplicate_input" for name in
           [*(f"n002_{i}.JPEG" for i in range(GOOD_PER_CLASS)), "outdir", "dangling.JPEG", "zero.JPEG", "null.jpg"]},
        **dict.fromkeys(("n001/out.JPEG", "n002/outdir", "elsewhere"), "outside_source"),
        **dict.fromkeys(("n002/dangling.JPEG", "gone"), "dangling_link"),
        **dict.fromkeys(("n002/zero.JPEG", "n002/null.jpg", "n003/pipe.JPEG", "fifo"), "not_a_file"),
    }
