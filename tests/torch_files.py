"""Damaging torch.save archives the way a disk error does, for the tests of what is checked on load."""

import zipfile
from pathlib import Path


def flip_byte_in_largest_tensor(path) -> None:
    """Change one byte in the middle of the biggest tensor's data inside a torch.save archive (its storages are
    the members ``<archive>/data/<n>``), leaving the archive's structure and the pickle intact."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        member = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    local_header = member.header_offset
    name_length = int.from_bytes(data[local_header + 26: local_header + 28], "little")
    extra_length = int.from_bytes(data[local_header + 28: local_header + 30], "little")
    position = local_header + 30 + name_length + extra_length + member.file_size // 2
    data[position] ^= 0x10
    path.write_bytes(bytes(data))
