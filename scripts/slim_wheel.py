"""Repack a wheel without some of its files, with a RECORD that matches: for carrying a large wheel to the
GPU machine, whose calls take at most 64 MiB of files. The nixl-cu13 wheel (59 MB) holds NIXL's expert-
parallel kernels (`nixl_ep_cu13/`, 27 MiB compressed), C++ headers and example programs, which osserve's KV
transport does not use; without them it is about 28 MiB:

    python scripts/slim_wheel.py .whl/nixl_cu13-1.5.1-cp312-cp312-manylinux_2_28_x86_64.whl \\
        --drop nixl_ep_cu13/ --drop nixl_cu13-1.5.1.data/headers/ --drop nixl_cu13-1.5.1.data/scripts/ \\
        --drop nixl_cu13.scripts/

The wheel is replaced in place (same name, so pip installs it as usual).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import tempfile
import zipfile
from pathlib import Path


def slim(path: Path, drop: list[str]) -> tuple[int, int]:
    """Rewrite `path` without the members starting with any of `drop`; (members dropped, bytes saved)."""
    before = path.stat().st_size
    with zipfile.ZipFile(path) as src:
        kept = [i for i in src.infolist() if not any(i.filename.startswith(p) for p in drop)]
        record = next(i.filename for i in kept if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".whl", delete=False) as tmp:
            out_path = Path(tmp.name)
        with zipfile.ZipFile(out_path, "w", zipfile.ZIP_DEFLATED) as out:
            for info in kept:
                if info.filename == record:
                    continue
                data = src.read(info)
                out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                lines.append(f"{info.filename},sha256={digest},{len(data)}")
            lines.append(f"{record},,")
            out.writestr(src.getinfo(record), "\n".join(lines) + "\n", compress_type=zipfile.ZIP_DEFLATED)
        num_dropped = len(src.infolist()) - len(kept)
    out_path.chmod(path.stat().st_mode)
    out_path.replace(path)
    return num_dropped, before - path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", type=Path)
    p.add_argument("--drop", action="append", required=True, metavar="PREFIX", help="member path prefix")
    args = p.parse_args(argv)
    n, saved = slim(args.wheel, args.drop)
    print(
        f"{args.wheel.name}: dropped {n} files, {saved / 2**20:.1f} MiB; now {args.wheel.stat().st_size / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
