"""Writes a full disk must not corrupt (hybrid_retrieval/storage.py), with a real file-size limit (``ulimit -f``:
EFBIG in the middle of a write) in a child process; the tmpfs tests of whole runs are in test_reliability.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hybrid_retrieval.storage import DiskFullError, is_disk_full

CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
from hybrid_retrieval.storage import DiskFullError, copy_file_atomic, write_bytes_atomic

folder = Path(sys.argv[1])
target = folder / "last.ckpt"
write_bytes_atomic(b"old" * 1000, target, "checkpoint last.ckpt")
big = folder / "big.bin"
big.write_bytes(b"x" * (3 << 20))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
errors = []
for write in (lambda: write_bytes_atomic(b"new" * (1 << 20), target, "checkpoint last.ckpt", "resume later"),
              lambda: copy_file_atomic(big, folder / "copy" / "big.bin", "MLflow artifact big.bin")):
    try:
        write()
        errors.append(None)
    except DiskFullError as error:
        errors.append(str(error))
print(json.dumps(errors))
"""


def test_a_write_past_the_limit_leaves_the_old_file_whole_and_no_partial_file(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors[0].startswith(f"disk full: checkpoint last.ckpt in {tmp_path} did not fit (needs 3.0 MB, ")
    assert errors[0].endswith("; resume later")
    assert errors[1].startswith(f"disk full: MLflow artifact big.bin in {tmp_path / 'copy'} did not fit (needs 3.0 MB")
    assert (tmp_path / "last.ckpt").read_bytes() == b"old" * 1000  # the previous file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "copy", "last.ckpt"]
    assert list((tmp_path / "copy").iterdir()) == []  # no partial copy under any name


def test_full_disk_errors_are_recognised_from_os_errors_and_library_messages() -> None:
    import errno

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(Exception("No space left on device (os error 28)"))  # the Rust tokenizers' own error
    assert is_disk_full(DiskFullError("x", Path("/"), 10))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad value"))
