"""Atomic writes under concurrency: what batch workers and replicas sharing a cache rely on."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from mam.files import write_atomic


def test_concurrent_writers_of_one_file_never_collide_or_leave_debris(tmp_path):
    target = tmp_path / "network.onnx"
    payloads = [bytes([i]) * 200_000 for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: write_atomic(target, p), payloads))
    assert target.read_bytes() in payloads  # whole, from one writer
    assert [p.name for p in tmp_path.iterdir()] == ["network.onnx"]  # no temporary files left
