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


def _write_many(args) -> None:
    target, byte, n = args
    from mam.files import write_atomic

    for _ in range(n):
        write_atomic(target, bytes([byte]) * 300_000)


def test_processes_sharing_a_cache_never_read_half_a_file(tmp_path):
    """Two pods writing one engine into a shared cache while a third reads it: every read is one
    writer's whole file (a fixed ``.tmp`` name let one rename the other's half-written file)."""
    import multiprocessing as mp

    target = tmp_path / "clip.engine"
    write_atomic(target, b"\0" * 300_000)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        job = pool.map_async(_write_many, [(target, 1, 40), (target, 2, 40)])
        seen = set()
        while not job.ready():
            data = target.read_bytes()
            assert len(data) == 300_000 and len(set(data)) == 1
            seen.add(data[0])
        job.get()
    assert seen & {1, 2} and [p.name for p in tmp_path.iterdir()] == ["clip.engine"]
