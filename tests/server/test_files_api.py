"""/v1/files end to end: official openai client, OpenAI schemas, limits, opaque ids, no leftovers."""

from __future__ import annotations

import hashlib

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(live, auth_headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=auth_headers["Authorization"][7:],
                         max_retries=0, timeout=60)


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "lwmtestboundary") -> tuple[bytes, str]:
    """A multipart body with parts in the given order: (name, filename or None, bytes)."""
    out = b""
    for name, filename, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_upload_list_retrieve_content_delete_with_the_sdk(client, live, server_media, validate, find_leftovers):
    data = (server_media / "h264.mp4").read_bytes()
    created = client.files.create(file=("clip.mp4", data, "video/mp4"), purpose="user_data")
    body = created.model_dump(exclude_none=True)
    validate("OpenAIFile", body)
    assert created.bytes == len(data) and created.filename == "clip.mp4" and created.purpose == "user_data"
    assert created.id.startswith("file-")

    listing = httpx.get(f"{live.base_url}/v1/files", headers=client.auth_headers, timeout=30).json()
    validate("ListFilesResponse", listing)
    assert created.id in [f["id"] for f in listing["data"]]
    assert [f.id for f in client.files.list()].count(created.id) == 1

    got = client.files.retrieve(created.id)
    assert got.model_dump(exclude_none=True) == body
    content = client.files.content(created.id).content
    assert hashlib.sha256(content).hexdigest() == hashlib.sha256(data).hexdigest()

    deleted = client.files.delete(created.id)
    validate("DeleteFileResponse", deleted.model_dump())
    assert deleted.id == created.id and deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert find_leftovers(live.data_dir) == []
    assert not (live.data_dir / "files" / "blobs" / created.id).exists()


def test_purpose_may_follow_the_file_and_listing_paginates(live, auth_headers, validate):
    ids = []
    for i in range(3):
        body, ctype = _multipart([("file", f"f{i}.bin", b"x" * (10 + i)), ("purpose", None, b"vision")])
        r = httpx.post(f"{live.base_url}/v1/files", content=body, headers={**auth_headers, "Content-Type": ctype})
        assert r.status_code == 200, r.text
        assert r.json()["purpose"] == "vision"
        ids.append(r.json()["id"])
    seen, after = [], None
    while True:
        params = {"limit": 1, "order": "asc", "purpose": "vision", **({"after": after} if after else {})}
        page = httpx.get(f"{live.base_url}/v1/files", params=params, headers=auth_headers).json()
        if not page["data"]:
            break
        validate("ListFilesResponse", page)
        seen += [f["id"] for f in page["data"]]
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert [i for i in seen if i in ids] == ids
    for i in ids:
        assert httpx.delete(f"{live.base_url}/v1/files/{i}", headers=auth_headers).status_code == 200


@pytest.mark.parametrize("path", [
    "/v1/files/..%2F..%2Fetc%2Fpasswd", "/v1/files/..%2Ffiles.sqlite3/content", "/v1/files/file-..",
    "/v1/files/file-0123456789abcdef01234567", "/v1/files/blobs", "/v1/files/%2Fetc%2Fpasswd/content",
])
def test_unknown_and_path_traversal_ids_are_404(live, auth_headers, validate, path):
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{live.base_url}{path}", headers=auth_headers)
        assert r.status_code == 404, (method, path, r.text)
        validate("ErrorResponse", r.json())
    assert httpx.get(f"{live.base_url}/health").status_code == 200


@pytest.mark.parametrize("parts, param, says", [
    ([("purpose", None, b"user_data")], "file", "'file' is a required property"),
    ([("file", "a.bin", b"abc")], "purpose", "'purpose' is a required property"),
    ([("purpose", None, b"nonsense"), ("file", "a.bin", b"abc")], "purpose", "is not one of"),
    ([("file", "a.bin", b"abc"), ("purpose", None, b"nonsense")], "purpose", "is not one of"),
    ([("file", "a.bin", b""), ("purpose", None, b"user_data")], "file", "empty"),
])
def test_bad_uploads_are_400_and_keep_nothing(live, auth_headers, validate, find_leftovers, parts, param, says):
    before = httpx.get(f"{live.base_url}/v1/files", headers=auth_headers).json()["data"]
    body, ctype = _multipart(parts)
    r = httpx.post(f"{live.base_url}/v1/files", content=body, headers={**auth_headers, "Content-Type": ctype})
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["param"] == param and says in r.json()["error"]["message"]
    assert httpx.get(f"{live.base_url}/v1/files", headers=auth_headers).json()["data"] == before
    assert find_leftovers(live.data_dir) == []


def test_json_body_and_missing_key_are_refused(live, auth_headers, validate):
    r = httpx.post(f"{live.base_url}/v1/files", json={"purpose": "user_data"}, headers=auth_headers)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    validate("ErrorResponse", r.json())
    r = httpx.get(f"{live.base_url}/v1/files")
    assert r.status_code == 401
    validate("ErrorResponse", r.json())


def test_too_large_uploads_are_413_with_the_limit(make_server, fixture_runtime, auth_headers, validate,
                                                  find_leftovers):
    server = make_server(fixture_runtime, max_upload_bytes=10_000)
    url = f"{server.base_url}/v1/files"
    # Past the limit while streaming (the body length alone does not tell) ...
    r = httpx.post(url, files={"file": ("big.bin", b"z" * 50_000)}, data={"purpose": "user_data"},
                   headers=auth_headers)
    assert r.status_code == 413, r.text
    validate("ErrorResponse", r.json())
    assert "10000 bytes" in r.json()["error"]["message"]
    # ... and refused from Content-Length alone for a body far beyond it.
    r = httpx.post(url, files={"file": ("huge.bin", b"z" * (3 << 20))}, data={"purpose": "user_data"},
                   headers=auth_headers)
    assert r.status_code == 413 and "10000 bytes" in r.json()["error"]["message"]
    assert httpx.get(url, headers=auth_headers).json()["data"] == []
    assert find_leftovers(server.data_dir) == []
    ok = httpx.post(url, files={"file": ("small.bin", b"z" * 9_000)}, data={"purpose": "user_data"},
                    headers=auth_headers)
    assert ok.status_code == 200, ok.text
