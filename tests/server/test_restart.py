"""Files (and the VQGAN code cache) survive a restart: a new app + server on the same data dir."""

from __future__ import annotations

import hashlib

import httpx


def test_files_uploaded_before_a_restart_are_listed_and_usable_after_it(make_server, vision_runtime, auth_headers,
                                                                        server_media, tmp_path):
    data_dir = tmp_path / "data"
    clip, image = server_media / "h264.mp4", server_media / "image.png"
    question = {"max_tokens": 3, "temperature": 0}

    def ask(server, file_id: str) -> httpx.Response:
        part = {"type": "video_url", "video_url": {"url": file_id, "max_frames": 2}}
        return httpx.post(f"{server.base_url}/v1/chat/completions", headers=auth_headers, timeout=300, json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What happens?"}, part]}], **question})

    before = make_server(vision_runtime, data_dir=data_dir)
    ids = []
    for path in (clip, image):
        r = httpx.post(f"{before.base_url}/v1/files", files={"file": (path.name, path.read_bytes())},
                       data={"purpose": "user_data"}, headers=auth_headers)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    first = ask(before, ids[0])
    assert first.status_code == 200, first.text
    listing = httpx.get(f"{before.base_url}/v1/files", headers=auth_headers).json()
    before.stop()

    after = make_server(vision_runtime, data_dir=data_dir)
    assert httpx.get(f"{after.base_url}/v1/files", headers=auth_headers).json() == listing
    for file_id, path in zip(ids, (clip, image)):
        content = httpx.get(f"{after.base_url}/v1/files/{file_id}/content", headers=auth_headers).content
        assert hashlib.sha256(content).digest() == hashlib.sha256(path.read_bytes()).digest()
    again = ask(after, ids[0])
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert after.services.vision.stats.frames_encoded == 0  # the code cache survived too
    assert ask(after, ids[1]).status_code == 200  # the image, never encoded before
    assert after.services.vision.stats.frames_encoded == 1
    deleted = httpx.delete(f"{after.base_url}/v1/files/{ids[1]}", headers=auth_headers)
    assert deleted.status_code == 200 and deleted.json()["deleted"]
