"""The chat endpoint on a sharded runtime (8 simulated devices) answers like one device."""

from __future__ import annotations

import httpx
import pytest

from lwm_serve.model.mesh import make_mesh
from lwm_serve.server.app import load_runtime_for
from lwm_serve.server.runtime import load_runtime


@pytest.mark.parametrize("mesh", ["1,1,2,4", "1,1,1,8"])
def test_chat_on_sequence_sharded_mesh_equals_single_device(reference_dir, fixture_runtime, make_server,
                                                           auth_headers, mesh):
    sharded = load_runtime(str(reference_dir / "model" / "params_scan"),
                           tokenizer=str(reference_dir / "tokenizer"), served_model_name="lwm-fixture",
                           max_model_len=1024, prefill_chunk=256, mesh=make_mesh(mesh), progress=False)
    assert sharded.generator.mesh is not None
    body = {"model": "lwm-fixture", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me what happens in the video, step by step."}]}
    answers = []
    for rt in (fixture_runtime, sharded):
        # No warm-up: compiling every prefill shape on 8 simulated devices takes minutes on
        # a shared 2-core CI host, and this test is about the answers, not start-up.
        server = make_server(rt, warmup=False)
        r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=auth_headers, timeout=300)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
        server.stop()
    assert answers[0] == answers[1]


def test_mesh_setting_builds_a_sharded_runtime(reference_dir):
    from lwm_serve.server.config import ServerSettings

    settings = ServerSettings(model=str(reference_dir / "model" / "params_scan"),
                              tokenizer=str(reference_dir / "tokenizer"), mesh="1,1,1,-1",
                              max_model_len=512, prefill_chunk=128)
    rt = load_runtime_for(settings, progress=False)
    assert dict(rt.generator.mesh.shape) == {"dp": 1, "fsdp": 1, "tp": 1, "sp": 8}
