"""The content-addressed image store: layout, dedup, atomic writes, hash validation, concurrency."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from iqa import store as store_module
from iqa.store import ImageStore, StoredImage

DATA = b"\x89PNG\r\n\x1a\n not really a png, but bytes are bytes"
SHA = hashlib.sha256(DATA).hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_writes_to_two_level_fan_out(tmp_path: Path) -> None:
    stored = ImageStore(tmp_path).put(DATA)
    assert stored == StoredImage(
        sha256=SHA, key=f"{SHA[:2]}/{SHA[2:4]}/{SHA}", path=tmp_path / SHA[:2] / SHA[2:4] / SHA, created=True
    )
    assert stored.path.read_bytes() == DATA
    assert _files(tmp_path) == [stored.path]


def test_second_put_is_deduplicated(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    first = store.put(DATA)
    mtime = first.path.stat().st_mtime_ns
    second = store.put(DATA)
    assert (first.created, second.created) == (True, False)
    assert second.path == first.path
    assert first.path.stat().st_mtime_ns == mtime  # not written again
    assert _files(tmp_path) == [first.path]


def test_put_with_known_hash_and_read_round_trip(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    assert not store.exists(SHA)
    stored = store.put(DATA, sha256=SHA)
    assert stored.path == store.path_for(SHA)
    assert store.exists(SHA)
    assert store.read(SHA) == DATA
    assert ImageStore.sha256_of(DATA) == SHA


def test_read_of_unknown_hash_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ImageStore(tmp_path).read("0" * 64)


@pytest.mark.parametrize(
    "bad",
    ["", "abc", SHA.upper(), SHA[:-1], SHA + "0", SHA[:-1] + "g", SHA + "\n", "../" + SHA[3:], "/" + SHA[1:]],
)
def test_malformed_hash_is_rejected(tmp_path: Path, bad: str) -> None:
    store = ImageStore(tmp_path / "root")
    for call in (store.path_for, store.exists, store.read, lambda s: store.put(DATA, sha256=s)):
        with pytest.raises(ValueError, match="SHA-256"):
            call(bad)
    assert not (tmp_path / "root").exists()


def test_put_leaves_no_temp_files(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    for i in range(5):
        store.put(DATA + bytes([i]))
    files = _files(tmp_path)
    assert len(files) == 5
    assert not [p for p in files if p.name.startswith(store_module.TEMP_PREFIX)]


def test_failed_write_leaves_neither_image_nor_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(store_module.os, "replace", crash)
    store = ImageStore(tmp_path)
    with pytest.raises(OSError, match="disk gone"):
        store.put(DATA)
    assert _files(tmp_path) == []
    assert not store.exists(SHA)


def test_crash_leftover_temp_file_is_not_an_image(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    folder = tmp_path / SHA[:2] / SHA[2:4]
    folder.mkdir(parents=True)
    leftover = folder / f"{store_module.TEMP_PREFIX}0123456789abcdef"
    leftover.write_bytes(DATA[:5])  # a half-written file from a crashed writer
    assert not store.exists(SHA)
    stored = store.put(DATA)
    assert stored.created
    assert store.read(SHA) == DATA


def test_concurrent_puts_of_same_bytes_leave_one_correct_file(tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    sha = hashlib.sha256(data).hexdigest()
    store = ImageStore(tmp_path)
    threads = 16
    barrier = threading.Barrier(threads)

    def put() -> StoredImage:
        barrier.wait()
        return store.put(data)

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda _: put(), range(threads)))

    assert {r.path for r in results} == {store.path_for(sha)}
    assert any(r.created for r in results)
    assert _files(tmp_path) == [store.path_for(sha)]
    assert store.read(sha) == data
