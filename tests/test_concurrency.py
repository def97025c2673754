"""Writers racing for one output path: the bundle appears whole (files are renamed into place) and
the last writer's complete bundle is what stays, with no temporary file left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from unweight_jax.bundle import BundleReader

STORIES = Path(__file__).resolve().parents[1] / "unweight_jax" / "data" / "stories260K.bin"
# Each round compresses the checkpoint several times so that the two writers overlap.
WRITER = """
import sys
from unweight_jax.compress import compress_checkpoint
for _ in range(int(sys.argv[3])):
    compress_checkpoint(sys.argv[1], sys.argv[2], cast_to_bf16=True, overwrite=True, progress=False,
                        max_shard_bytes=int(sys.argv[4]) or None)
"""


def read_whole(path: Path) -> list[str]:
    """Open and decode every tensor; returns the tensor names."""
    reader = BundleReader(path)
    for name in reader.names:
        reader.decode(name)
    return reader.names


def race(out: Path, *, rounds: int, max_shard_bytes: int = 0, poll: Path | None = None) -> int:
    """Runs two writers at once; while they run, reads `poll` whenever it exists (counting the reads)."""
    args = [str(STORIES), str(out), str(rounds), str(max_shard_bytes)]
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, *args], stderr=subprocess.PIPE) for _ in range(2)]
    reads = 0
    while any(w.poll() is None for w in writers):
        if poll is not None and poll.exists():
            read_whole(poll)  # a BundleError here is a reader seeing a half-written bundle
            reads += 1
    for w in writers:
        assert w.wait() == 0, w.stderr.read().decode()
    return reads


@pytest.mark.slow
def test_two_writers_one_reader_single_file(tmp_path: Path) -> None:
    out = tmp_path / "m.unw.safetensors"
    reads = race(out, rounds=4, poll=out)
    assert reads > 0, "the reader never saw the bundle while the writers ran"
    assert len(read_whole(out)) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.slow
def test_two_writers_sharded(tmp_path: Path) -> None:
    """Sharded: the shards and index both writers leave agree, whichever renamed last."""
    out = tmp_path / "m.unw.safetensors"
    race(out, rounds=2, max_shard_bytes=100_000)
    reader = BundleReader(out)
    assert reader.index is not None and len(reader.files) > 1
    read_whole(out)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([reader.index.name, *(f.name for f in reader.files)])
