"""The LWM-Nano evaluation harness end to end: the real server on the demo model (random
weights, so nothing is asserted about accuracy), every path and question type, the
CLI, and the media the sensitivity options send."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from lwm_serve.nano import evaluate as ev
from lwm_serve.nano import questions, world
from lwm_serve.nano.eval_report import KINDS, Answer, Drawing, EvalReport, format_summary
from lwm_serve.server.local import running_server
from lwm_serve.tokenizers.media_decode import decode_media, preprocess_frame

REPO = Path(__file__).resolve().parents[2]
API_KEY = "nano-eval-key"
VIDEOS, IMAGES, GENERATIONS = 3, 2, 2


def _offset_with_every_question() -> int:
    """The first held-out offset whose slice holds a one-object video and image (so the
    shape question is asked on every path): read from the world, not assumed."""
    for offset in range(1000):
        vids = [world.scene_from_seed(s) for s in ev.held_out_seeds(VIDEOS, offset)]
        imgs = [world.scene_from_seed(s, "image") for s in ev.held_out_seeds(IMAGES, offset)]
        if any(len(s.objects) == 1 for s in vids) and any(len(s.objects) == 1 for s in imgs):
            return offset
    raise AssertionError("no slice with one-object scenes")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LWM_SERVE_HOME", str(tmp_path_factory.mktemp("home")))  # the demo is built there
        # No warmup and few slots: fewer shapes to compile, the slice's requests queue instead.
        flags = ["--api-key", API_KEY, "--no-warmup", "--max-num-seqs", "4", "--max-model-len", "2560",
                 "--data-dir", str(tmp_path_factory.mktemp("data"))]
        with running_server("demo", flags) as base:
            yield base


def test_a_small_slice_runs_every_path_and_question_type(server: str) -> None:
    offset = _offset_with_every_question()
    report = ev.evaluate(server, api_key=API_KEY, videos=VIDEOS, images=IMAGES, generations=GENERATIONS,
                         offset=offset, concurrency=8)
    s = report.summary()
    assert s["model"] == "lwm-demo"
    assert s["errors"] == 0, s["error_examples"]
    expected = {"chat-video": [q for seed in ev.held_out_seeds(VIDEOS, offset)
                               for q in questions.questions_for(world.scene_from_seed(seed), "video")],
                "chat-image": [q for seed in ev.held_out_seeds(IMAGES, offset)
                               for q in questions.questions_for(world.scene_from_seed(seed, "image"), "image")]}
    expected["multipart"] = expected["chat-video"]
    assert set(s["by_path"]) == set(ev.PATHS)
    for path, qas in expected.items():
        assert s["by_path"][path]["total"] == len(qas)
        for kind in KINDS:
            cell = s["by_path_kind"][path][kind]
            assert cell["total"] == sum(q.kind == kind for q in qas)
            want_some = kind != "direction" or path != "chat-image"  # no motion in a still image
            assert (cell["total"] > 0) is want_some, (path, kind)
            if cell["total"]:
                assert 0.0 <= cell["accuracy"] <= 1.0
    for kind in KINDS:
        assert s["by_kind"][kind]["total"] > 0 and 0.0 <= s["by_kind"][kind]["accuracy"] <= 1.0
    moving, still = s["direction_moving"], s["direction_still"]
    assert moving["total"] + still["total"] == s["by_kind"]["direction"]["total"]
    # each reply is graded as the questions module grades it
    for a in report.answers:
        assert a.correct == questions.grade(a.kind, a.reply, a.truth)
    g = s["generation"]
    assert g["prompts"] == GENERATIONS
    for key in ("color", "shape", "both"):
        assert g[key]["total"] == GENERATIONS and 0.0 <= g[key]["accuracy"] <= 1.0
    table = format_summary(s)
    assert all(p in table for p in ev.PATHS) and "image generation" in table
    json.dumps(s)  # JSON-able


def test_the_cli_prints_json_against_a_running_server(server: str) -> None:
    # The slice above's first video and image: their codes are in the server's cache by now.
    offset = str(_offset_with_every_question())
    out = subprocess.run([sys.executable, str(REPO / "bench" / "nano_eval.py"), "--url", server, "--api-key",
                          API_KEY, "--offset", offset, "--videos", "1", "--images", "1", "--generations", "0",
                          "--paths",
                          "chat-video,chat-image", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout)
    assert set(s["by_path"]) == {"chat-video", "chat-image"} and s["errors"] == 0
    assert s["questions"] == s["overall"]["total"] > 0


def test_a_wrong_key_is_a_clear_error(server: str) -> None:
    with pytest.raises(RuntimeError, match="401"):
        ev.evaluate(server, api_key="not-the-key", videos=1, images=0, generations=0)


def test_server_flags_are_parsed_as_lwm_serve_parses_them() -> None:
    from lwm_serve.server.local import settings_from_flags

    settings = settings_from_flags("demo", ["--frame-layout", "vision_chat", "--max-num-seqs", "3", "--port", "9"])
    assert (settings.model, settings.frame_layout, settings.max_num_seqs) == ("demo", "vision_chat", 3)
    with pytest.raises(SystemExit):
        settings_from_flags("demo", ["--frame-layout", "sideways"])


def test_seeds_stay_held_out_and_paths_are_checked() -> None:
    assert min(ev.held_out_seeds(5)) == world.HELD_OUT_SEED_BASE
    with pytest.raises(ValueError, match="offset"):
        ev.held_out_seeds(1, -1)
    with pytest.raises(ValueError, match="unknown paths"):
        ev.evaluate("http://127.0.0.1:9", paths=["chat-audio"])
    with pytest.raises(ValueError, match="videos must be >= 0"):
        ev.evaluate("http://127.0.0.1:9", videos=-1)


def test_reversed_videos_play_backwards_and_keep_the_forward_truth() -> None:
    seed = next(s for s in ev.held_out_seeds(50) if any(o.direction != "still"
                                                        for o in world.scene_from_seed(s).objects))
    medium = ev.make_medium("video", seed, reverse=True)
    scene = world.scene_from_seed(seed)
    frames = [f for _, f in decode_media(medium.data)]
    assert len(frames) == scene.num_frames
    truth = scene.frames()
    for t, frame in enumerate(frames):  # frame t of the reversed clip is nearest forward frame T-1-t
        dists = [np.abs(frame.astype(int) - f.astype(int)).mean() for f in truth]
        assert int(np.argmin(dists)) == scene.num_frames - 1 - t
    # direction truths come from the scene, i.e. forward, whatever was sent
    truths = {q.answer for q in questions.questions_for(medium.scene, "video") if q.kind == "direction"}
    assert truths == {o.direction for o in scene.objects}


def test_off_centre_makes_the_server_crop_miss_the_left_half() -> None:
    seed = world.HELD_OUT_SEED_BASE
    medium = ev.make_medium("image", seed, frame_transform=ev.off_centre)
    (_, frame), = decode_media(medium.data)
    original = world.scene_from_seed(seed, "image").frames()[0]
    assert frame.shape == (world.FRAME, 2 * world.FRAME, 3)
    seen = np.round((preprocess_frame(frame) + 1) * 127.5).astype(np.uint8)  # what the VQGAN gets
    np.testing.assert_array_equal(seen[:, : world.FRAME // 2], original[:, world.FRAME // 2:])
    assert not seen[:, world.FRAME // 2:].any()
    # visible=0: the crop sees black only
    (_, frame), = decode_media(ev.make_medium("image", seed, frame_transform=functools.partial(
        ev.off_centre, visible=0.0)).data)
    assert preprocess_frame(frame).max() == -1.0
    with pytest.raises(ValueError, match="frame_transform"):
        ev.make_medium("video", seed, frame_transform=lambda f: f[0])


def test_the_report_counts_and_names_mistakes() -> None:
    answers = [Answer("chat-video", "video", 1, "color", "What color is the circle?", "red", "It is red.", True, None),
               Answer("chat-video", "video", 1, "color", "What color is the square?", "blue", "It is red.", False,
                      None),
               Answer("multipart", "video", 1, "direction", "Which way is the circle moving?", "left", "left or up",
                      False, True),
               Answer("multipart", "video", 1, "direction", "Which way is the square moving?", "still",
                      "It is standing still.", True, False),
               Answer("multipart", "video", 1, "count", "How many shapes are there?", "two", "", False, None,
                      error="boom")]
    drawings = [Drawing("a red circle.", "red", "circle", 0, "red", "square"),
                Drawing("a blue square.", "blue", "square", 1, None, None)]
    s = EvalReport("m", answers, drawings, {"videos": 1, "images": 0, "offset": 0, "reverse": False,
                                            "frame_transform": None}, 1.0).summary()
    assert s["by_kind"]["color"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert s["by_kind"]["shape"] == {"correct": 0, "total": 0, "accuracy": None}
    assert s["direction_moving"]["accuracy"] == 0.0 and s["direction_still"]["accuracy"] == 1.0
    assert s["by_path"]["multipart"]["total"] == 3
    assert s["mistakes"]["color"] == [{"truth": "blue", "said": "red", "count": 1}]
    assert s["mistakes"]["direction"] == [{"truth": "left", "said": "(several)", "count": 1}]
    assert s["mistakes"]["count"] == [{"truth": "two", "said": "(error)", "count": 1}]
    assert s["errors"] == 1 and s["error_examples"] == ["boom"]
    assert s["generation"]["color"]["correct"] == 1 and s["generation"]["shape"]["correct"] == 0
    assert s["generation"]["no_single_object"] == 1
    assert "ERRORS" in format_summary(s)
