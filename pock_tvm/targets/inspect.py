"""What a built library holds, read from its bytes: machine, Mach-O kind, embedded CUDA cubins."""

from __future__ import annotations

import struct
from pathlib import Path

FATBIN_MAGIC = b"\x50\xed\x55\xba"  # 0xBA55ED50, little-endian
ELF_MACHINES = {62: "x86_64", 183: "aarch64", 190: "cuda"}
MACHO_64 = 0xFEEDFACF
MACHO_CPU = {0x0100000C: "arm64", 0x01000007: "x86_64"}
MACHO_FILETYPE = {1: "object", 2: "executable", 6: "dylib", 8: "bundle"}


def library_kind(path: str | Path) -> dict:
    """``{"format": "elf"|"mach-o", "machine": ..., ...}`` of a shared library."""
    data = Path(path).read_bytes()[:64]
    if data[:4] == b"\x7fELF":
        return {"format": "elf", "machine": ELF_MACHINES.get(struct.unpack_from("<H", data, 18)[0], "other")}
    if len(data) >= 16 and struct.unpack_from("<I", data)[0] == MACHO_64:
        cpu, _, filetype = struct.unpack_from("<iiI", data, 4)
        return {"format": "mach-o", "machine": MACHO_CPU.get(cpu & 0xFFFFFFFF, "other"),
                "filetype": MACHO_FILETYPE.get(filetype, str(filetype))}
    return {"format": "unknown", "machine": "unknown"}


def cubin_archs(path: str | Path) -> list[str]:
    """``sm_XX`` of every ELF cubin in the CUDA fat binaries embedded in a library (empty when
    the library holds CUDA source or no CUDA code)."""
    data = Path(path).read_bytes()
    archs, start = [], 0
    while (i := data.find(FATBIN_MAGIC, start)) >= 0:
        header_size, fat_size = struct.unpack_from("<HQ", data, i + 6)[0], struct.unpack_from("<Q", data, i + 8)[0]
        j, end = i + header_size, i + header_size + fat_size
        while j + 32 <= end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, j)
            arch = struct.unpack_from("<I", data, j + 28)[0]
            if kind == 2:  # ELF cubin (1 is PTX)
                archs.append(f"sm_{arch}")
            if entry_header == 0:
                break
            j += entry_header + size
        start = max(end, i + 4)
    return archs
