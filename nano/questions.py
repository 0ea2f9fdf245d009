"""The fixed question templates of LWM-Nano's world, their answers, and grading.

Every answer is a short sentence holding exactly one answer word of its
question's type; `grade` finds the answer words in a reply and accepts it only
when there is exactly one and it is the right one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from lwm_serve.nano.world import COLORS, COUNT_WORDS, DIRECTIONS, SHAPES, Scene

Kind = Literal["shape", "color", "direction", "count"]
Medium = Literal["video", "image"]

ANSWER_WORDS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "direction": DIRECTIONS,
    "count": COUNT_WORDS,
}


@dataclasses.dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str  # the answer word
    reply: str  # the sentence the model is trained to give


def shape_question(medium: Medium) -> str:
    return f"What shape is in the {medium}?"


def color_question(shape: str) -> str:
    return f"What color is the {shape}?"


def direction_question(shape: str) -> str:
    return f"Which way is the {shape} moving?"


COUNT_QUESTION = "How many shapes are there?"


def reply_for(kind: str, word: str) -> str:
    """The sentence the model is trained to give when the answer word is `word`."""
    if kind == "shape":
        return f"It is a {word}."
    if kind == "color":
        return f"It is {word}."
    if kind == "direction":
        return "It is standing still." if word == "still" else f"It is moving {word}."
    if kind == "count":
        return "There is one shape." if word == "one" else f"There are {word} shapes."
    raise ValueError(f"unknown question kind {kind!r}")


def questions_for(scene: Scene, medium: Medium) -> list[QA]:
    """Every question that applies to a scene, with its answer.

    The shape question needs a single object; motion questions need a video.
    """
    qas: list[QA] = []
    if len(scene.objects) == 1:
        shape = scene.objects[0].shape
        qas.append(QA("shape", shape_question(medium), shape, reply_for("shape", shape)))
    for obj in scene.objects:
        qas.append(QA("color", color_question(obj.shape), obj.color, reply_for("color", obj.color)))
    if medium == "video":
        for obj in scene.objects:
            d = obj.direction
            qas.append(QA("direction", direction_question(obj.shape), d, reply_for("direction", d)))
    n = COUNT_WORDS[len(scene.objects) - 1]
    qas.append(QA("count", COUNT_QUESTION, n, reply_for("count", n)))
    return qas


def image_prompt(color: str, shape: str) -> str:
    """The image-generation prompt (the server wraps it as 'Generate an image of {prompt}')."""
    return f"a {color} {shape}."


_WORD = re.compile(r"[a-z]+")


def answer_words(kind: str, reply: str) -> list[str]:
    """The answer words of `kind` that a reply contains, in order."""
    allowed = set(ANSWER_WORDS[kind])
    return [w for w in _WORD.findall(reply.lower()) if w in allowed]


def grade(kind: str, reply: str, truth: str) -> bool:
    """Right only when the reply names exactly one answer word of its kind, the true one."""
    words = answer_words(kind, reply)
    return len(words) == 1 and words[0] == truth


# A little plain-text chat, so a greeting gets a sentence back.
SMALL_TALK: tuple[tuple[str, str], ...] = (
    ("Hello!", "Hello! Show me a video or an image of shapes and ask me about it."),
    ("Hi", "Hi! I can tell you the shape, color, motion and number of shapes in a video."),
    ("Who are you?", "I am LWM-Nano, a tiny world model trained on videos of moving shapes."),
    ("What can you do?", "I answer questions about shapes in videos and images, and I draw shapes."),
    ("Thank you!", "You are welcome!"),
    ("How are you?", "I am fine, thank you. Show me a video of shapes."),
)
