"""The shipped LWM-Nano weights (`--model nano`), judged by their answers through the real API.

A held-out slice of the evaluation (`bench/nano_eval.py`'s code) against the real server on
the packaged weights: the answers are only right when the whole path (PyAV decode,
preprocessing, VQGAN, token layout, model, detokenizer) works.

These are NOT the issue's acceptance bars (>= 85% on the CI slice, >= 90% per question
type): the shipped weights do not reach them (README, "Where it stands"). What is asserted
is what they do reach, well clear of chance: counting and colour on held-out videos, and
that a wrong crop takes the counting away.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from lwm_serve.nano import evaluate as ev
from lwm_serve.server.local import running_server
from lwm_serve.server import runtime

VIDEOS = 20
FLAGS = ["--no-warmup", "--max-num-seqs", "16", "--max-model-len", "2560"]
# Chance: one of three counts, one of five colours. Measured on this slice (held-out seeds
# from offset 0, chat with video_url): count 17/20, colour 24/44.
COUNT_BAR, COLOR_BAR = 0.6, 0.4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server("nano", [*FLAGS, "--data-dir", str(tmp_path_factory.mktemp("data"))]) as base:
        yield base


@pytest.fixture(scope="module")
def forward(server: str) -> dict:
    return _videos(server)


def _videos(base: str, **options) -> dict:
    s = ev.evaluate(base, videos=VIDEOS, images=0, generations=0, paths=["chat-video"], concurrency=16,
                    **options).summary()
    assert s["errors"] == 0, s["error_examples"]
    return s


def test_the_shipped_weights_are_in_the_package() -> None:
    root = runtime.nano_dir()
    assert (root / "params").stat().st_size > 1e6 and (root / "vqgan" / "vqgan_params.pkl").is_file()
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) <= 25 * 2**20


def test_held_out_videos_are_counted_and_coloured_well_above_chance(forward: dict) -> None:
    s = forward
    assert s["model"] == "lwm-nano"
    assert s["by_kind"]["count"]["accuracy"] >= COUNT_BAR, s["by_kind"]
    assert s["by_kind"]["color"]["accuracy"] >= COLOR_BAR, s["by_kind"]


def test_a_wrong_crop_takes_the_counting_away(server: str, forward: dict) -> None:
    # The scene moved where the server's centre crop cuts half of it away: the same videos,
    # counted right above, are now counted about as well as chance.
    right = forward["by_kind"]["count"]["accuracy"]
    cropped = _videos(server, frame_transform=ev.off_centre)["by_kind"]["count"]["accuracy"]
    assert cropped <= 0.5 and right - cropped >= 0.3, (right, cropped)
