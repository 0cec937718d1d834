"""What other host files a disk image makes QEMU open: a qcow2 image's backing chain.

A qcow2 image names its backing file (and, since qcow2 v3, an external data file) in its
header; QEMU opens them with the image. A caller that may use only images below certain
directories must check those names too, or a crafted overlay would read any host file or
device into the guest. `referenced_files` reads them from the header (no QEMU needed);
anything that is not a qcow2 image references nothing (QEMU opens our disks with an
explicit format, so it never probes them).
"""

from __future__ import annotations

import os
import struct
from typing import Final, Literal

import msgspec

__all__ = ["QCOW2_MAGIC", "ImageReference", "ImageReferenceError", "referenced_files"]

QCOW2_MAGIC: Final = b"QFI\xfb"

#: The header, its extensions and the backing file name live in the first cluster;
#: qcow2 clusters are 512 B to 2 MiB (cluster_bits 9..21).
_CLUSTER_BITS: Final = range(9, 22)
#: Header extension types (qcow2 specification, docs/interop/qcow2.txt).
_EXT_END: Final = 0
_EXT_BACKING_FORMAT: Final = 0xE2792ACA
_EXT_DATA_FILE: Final = 0x44415441
#: The header length of version 2 images; version 3 records its own at offset 100.
_V2_HEADER_LENGTH: Final = 72


class ImageReferenceError(ValueError):
    """An image header that cannot be read as qcow2 although it carries the magic."""


class ImageReference(msgspec.Struct, frozen=True):
    """A file an image makes QEMU open, and the format it is opened with (None: QEMU
    probes the file to guess it)."""

    kind: Literal["backing file", "data file"]
    path: str
    format: str | None


def referenced_files(path: str) -> list[ImageReference]:
    """The backing file and external data file a qcow2 image at `path` names.

    Relative names are resolved against the directory of `path` as given (as QEMU does).
    A protocol name (``nbd:``, ``json:``) is returned as it is. Raises OSError when the
    file cannot be read, `ImageReferenceError` for a damaged qcow2 header.
    """
    with open(path, "rb") as image:
        start = image.read(24)
        if start[:4] != QCOW2_MAGIC:
            return []
        cluster_bits = struct.unpack_from(">I", start, 20)[0] if len(start) == 24 else 0
        if cluster_bits not in _CLUSTER_BITS:
            raise ImageReferenceError(f"{path}: damaged qcow2 header (cluster_bits)")
        header = start + image.read((1 << cluster_bits) - len(start))
    try:
        return _references(header, os.path.dirname(path))
    except (struct.error, ImageReferenceError) as error:
        raise ImageReferenceError(f"{path}: damaged qcow2 header ({error})") from None


def _references(header: bytes, directory: str) -> list[ImageReference]:
    version, backing_offset, backing_size = struct.unpack_from(">IQI", header, 4)
    header_length = _V2_HEADER_LENGTH if version < 3 else struct.unpack_from(">I", header, 100)[0]
    backing_format: str | None = None
    data_file: str | None = None
    offset = header_length
    while offset + 8 <= len(header):
        kind, length = struct.unpack_from(">II", header, offset)
        if kind == _EXT_END:
            break
        data = header[offset + 8 : offset + 8 + length]
        if kind == _EXT_BACKING_FORMAT:
            backing_format = _text(data)
        elif kind == _EXT_DATA_FILE:
            data_file = _text(data)
        offset += 8 + (length + 7) // 8 * 8
    references = []
    if backing_offset:
        if backing_offset + backing_size > len(header):
            raise ImageReferenceError("the backing file name lies beyond the header")
        name = _text(header[backing_offset : backing_offset + backing_size])
        references.append(ImageReference("backing file", _resolve(directory, name), backing_format))
    if data_file:
        references.append(ImageReference("data file", _resolve(directory, data_file), "raw"))
    return references


def _text(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace")


def _resolve(directory: str, name: str) -> str:
    if os.path.isabs(name) or _has_protocol(name):
        return name
    return os.path.join(directory, name)


def _has_protocol(name: str) -> bool:
    """QEMU's ``path_has_protocol``: a ``:`` before any ``/`` names a protocol."""
    colon = name.find(":")
    return colon > 0 and "/" not in name[:colon]
