"""The file store: limits, hashes, restarts, opaque ids, no leftovers."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from lwm_serve.server.stores.files import EmptyFile, FileNotFound, FileStore, FileTooLarge


def test_save_get_list_delete_and_restart(tmp_path):
    store = FileStore(tmp_path, max_bytes=1000)
    data = b"hello video" * 10
    rec = store.save_chunks([data[:50], data[50:]], "clip.mp4", "vision", "video/mp4")
    assert rec.bytes == len(data) and rec.sha256 == hashlib.sha256(data).hexdigest()
    assert store.path(rec.id).read_bytes() == data
    store.close()

    reopened = FileStore(tmp_path, max_bytes=1000)  # a restart
    assert [f.id for f in reopened.list()] == [rec.id]
    assert reopened.get(rec.id) == rec
    reopened.delete(rec.id)
    with pytest.raises(FileNotFound):
        reopened.get(rec.id)
    assert list((tmp_path / "blobs").iterdir()) == []


def test_too_large_and_empty_uploads_leave_nothing(tmp_path):
    store = FileStore(tmp_path, max_bytes=10)
    kept = store.save_chunks([b"12345"], "a.bin", "vision")
    with pytest.raises(FileTooLarge):
        store.save_chunks([b"123456", b"789012"], "big.bin", "vision")
    with pytest.raises(EmptyFile):
        store.save_chunks([], "empty.bin", "vision")
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [kept.id]
    assert [f.id for f in store.list()] == [kept.id]


def test_async_stream_upload(tmp_path):
    store = FileStore(tmp_path, max_bytes=100)

    async def chunks(parts):
        for p in parts:
            yield p

    rec = asyncio.run(store.save_stream(chunks([b"ab", b"cd"]), "x.png", "vision"))
    assert store.path(rec.id).read_bytes() == b"abcd"
    with pytest.raises(FileTooLarge):
        asyncio.run(store.save_stream(chunks([b"x" * 60, b"y" * 60]), "y.png", "vision"))
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [rec.id]


@pytest.mark.parametrize("bad_id", ["../files.sqlite3", "file-../../etc/passwd", "", "file-XYZ",
                                    "blobs/file-000000000000000000000000"])
def test_ids_are_opaque(tmp_path, bad_id):
    store = FileStore(tmp_path, max_bytes=100)
    with pytest.raises(FileNotFound):
        store.path(bad_id)


def test_client_filename_is_only_a_label(tmp_path):
    store = FileStore(tmp_path, max_bytes=100)
    rec = store.save_chunks([b"x"], "../../etc/evil name.mp4", "vision")
    assert rec.filename == "evil name.mp4"
    assert store.path(rec.id).parent == tmp_path / "blobs"
