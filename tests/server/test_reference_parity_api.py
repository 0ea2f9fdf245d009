"""Reference parity over HTTP: the `generate_chat_greedy` case's input media, uploaded as a
real file and asked about through /v1/chat/completions on a server started with
`--frame-layout vision_chat` (the reference script's layout), greedy, gives the case's
tokens. Every fact (the media, the question, the number of tokens) is read from the case."""

from __future__ import annotations

import json

import openai
import pytest

from lwm_serve.server.handlers.logprobs import TokenTexts


@pytest.fixture(scope="module")
def server(launch, vision_runtime):
    srv = launch(vision_runtime, frame_layout="vision_chat")
    yield srv
    srv.stop()


def test_chat_greedy_over_http_gives_the_reference_tokens(server, auth_headers, reference_dir, vision_runtime):
    case = json.loads((reference_dir / "cases" / "generate_chat_greedy" / "case.json").read_text())
    # Same prompt row as generate_chat_sampled (fixture README §6): its flags carry the question.
    question = json.loads((reference_dir / "cases" / "generate_chat_sampled" / "case.json").read_text())["flags"]["prompt"]
    expected = [int(t) for t in case["output_ids"][0]]
    eos = vision_runtime.tokenizer.eos_id
    if eos in expected:  # the reference pads after EOS; the server stops there
        expected = expected[: expected.index(eos)]
    media = reference_dir / case["input_file"]
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=auth_headers["Authorization"][7:], max_retries=0,
                           timeout=300)
    file_id = client.files.create(file=(media.name, media.read_bytes()), purpose="user_data").id
    reply = client.chat.completions.create(
        model=server.model, temperature=0, max_tokens=len(case["output_ids"][0]), logprobs=True,
        messages=[{"role": "user", "content": [{"type": "text", "text": question},
                                               {"type": "image_url", "image_url": {"url": file_id}}]}])
    choice = reply.choices[0]
    assert reply.usage.completion_tokens == len(expected)
    texts = TokenTexts(vision_runtime.tokenizer)  # each token's (text, bytes), as the logprobs show them
    assert [(t.token, t.bytes) for t in choice.logprobs.content] == [texts(i) for i in expected]
    assert choice.message.content == vision_runtime.tokenizer.decode(expected)
