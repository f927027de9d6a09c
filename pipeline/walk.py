"""A local source tree, walked safely: the files a listing may read, and a reject reason for the rest.

pyarrow's recursive listing follows every symlink (a link to a parent folder is followed ~40 levels
deep, until the kernel gives up) and silently drops dangling links, FIFOs and devices. Here:

* a link is followed only when its target lies inside the source root (``outside_source``
  otherwise), and a link to a folder only when that folder does not contain the link
  (``symlink_loop``); each real folder is walked once (``duplicate_input`` for a second way in);
* a dangling link is ``dangling_link``; a FIFO, socket or device, or a link to one, is ``not_a_file``.
  Entries are only ``stat``-ed, never opened: opening a FIFO blocks, opening a device may act;
* a folder that cannot be read stops the listing with one line (``ValueError``): its images are
  unknown, and a class that silently went missing would change every label after it;
* an entry reached through a link carries ``target``, the path under the root of the file it stands
  for (or, if rejected, of the same entry reached without links), so that the listing keeps each
  entry once (``listing.combine``).

Local filesystem only: object stores have no links, FIFOs or devices.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from subspectral.schemas.reasons import RejectReason


@dataclass(frozen=True)
class Entry:
    """A file, a folder, or a rejected entry (``reason`` set) found under a source root."""

    path: str  # as reached: links in it are not resolved
    is_dir: bool = False
    size: int = -1
    reason: RejectReason | None = None
    detail: str = ""
    target: str | None = None  # reached through a link: the path under the root it stands for (or is, seen
    #                            from the link-free way in, for a rejected entry in a linked folder)


def special_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "link")):
        if test(mode):
            return name
    return "special file"


def _scandir(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda dirent: dirent.name)
    except OSError as error:
        raise ValueError(f"{folder}: cannot list this folder ({error.strerror or error}); fix its permissions, or "
                         "move it out of the source") from None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class SourceTree:
    """One source root (a ``--src`` folder) and the rules above for everything below it."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        self.real_root = os.path.realpath(self.root)

    def under_root(self, real: str) -> str:
        """The path under the root (as the user named it) of a real path inside the root."""
        relative = os.path.relpath(real, self.real_root)
        return self.root if relative == "." else posixpath.join(self.root, relative)

    def scan(self, folder: str) -> list[Entry]:
        """The entries of one folder, by name; folders are not entered."""
        real = os.path.realpath(folder)
        return [self._classify(dirent, real, (real,), self._via(folder, real)) for dirent in _scandir(folder)]

    def walk(self, folder: str) -> Iterator[Entry]:
        """Files and rejected entries below ``folder``; real folders are walked before linked ones."""
        real = os.path.realpath(folder)
        seen = {real: folder}  # real folder -> the path it was first walked as
        linked: list[tuple[Entry, tuple[str, ...]]] = []
        yield from self._walk(folder, real, (real,), self._via(folder, real), seen, linked)
        while linked:
            entry, ancestors = linked.pop(0)
            real = os.path.realpath(entry.path)
            if real in seen:
                yield Entry(entry.path, reason=RejectReason.DUPLICATE_INPUT, detail=f"the same folder as {seen[real]}")
                continue
            seen[real] = entry.path
            yield from self._walk(entry.path, real, (*ancestors, real), entry.target, seen, linked)

    def _via(self, folder: str, real: str) -> str | None:
        """``folder``'s path under the root when ``folder`` is itself reached through a link."""
        logical = self.under_root(real) if _inside(real, self.real_root) else None
        return logical if logical != folder.rstrip("/") else None

    def _walk(self, folder: str, real: str, ancestors: tuple[str, ...], via: str | None, seen: dict[str, str],
              linked: list[tuple[Entry, tuple[str, ...]]]) -> Iterator[Entry]:
        for dirent in _scandir(folder):
            entry = self._classify(dirent, real, ancestors, via)
            if not entry.is_dir or entry.reason:
                yield entry
            elif dirent.is_symlink():
                linked.append((entry, ancestors))  # after every real folder: the real path wins
            else:
                child = posixpath.join(real, dirent.name)
                seen[child] = entry.path
                yield from self._walk(entry.path, child, (*ancestors, child), entry.target, seen, linked)

    def _classify(self, dirent: os.DirEntry, real_parent: str, ancestors: tuple[str, ...],
                  via: str | None) -> Entry:
        path = dirent.path
        target = posixpath.join(via, dirent.name) if via else None  # the same entry, reached without links
        if dirent.is_symlink():
            entry = self._link(path, real_parent, ancestors)
            return entry if entry.target or not target else dataclasses.replace(entry, target=target)
        try:
            info = dirent.stat(follow_symlinks=False)
        except OSError as error:
            return Entry(path, reason=RejectReason.UNREADABLE, detail=error.strerror or str(error), target=target)
        if stat.S_ISDIR(info.st_mode):
            return Entry(path, is_dir=True, target=target)
        if stat.S_ISREG(info.st_mode):
            return Entry(path, size=info.st_size, target=target)
        return Entry(path, reason=RejectReason.NOT_A_FILE,
                     detail=f"a {special_kind(info.st_mode)}: never opened", target=target)

    def _link(self, path: str, real_parent: str, ancestors: tuple[str, ...]) -> Entry:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return Entry(path, reason=RejectReason.DANGLING_LINK,
                         detail=f"link to {os.readlink(path)}, which does not exist")
        except OSError as error:
            if error.errno == errno.ELOOP:
                return Entry(path, reason=RejectReason.SYMLINK_LOOP, detail="a chain of links that never ends")
            return Entry(path, reason=RejectReason.UNREADABLE, detail=error.strerror or str(error))
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            return Entry(path, reason=RejectReason.NOT_A_FILE,
                         detail=f"link to a {special_kind(info.st_mode)}: never opened")
        real = os.path.realpath(path)
        if not _inside(real, self.real_root):
            return Entry(path, reason=RejectReason.OUTSIDE_SOURCE,
                         detail=f"link to {real}, outside the source {self.root}")
        target = self.under_root(real)
        if stat.S_ISREG(info.st_mode):
            return Entry(path, size=info.st_size, target=target)
        if real in ancestors or _inside(real_parent, real):
            return Entry(path, reason=RejectReason.SYMLINK_LOOP, detail=f"link to {target}, a folder it is in")
        return Entry(path, is_dir=True, target=target)
