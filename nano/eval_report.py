"""The graded results of an LWM-Nano evaluation (`nano.evaluate`), their summary and table."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from lwm_serve.nano import questions

KINDS: tuple[str, ...] = tuple(questions.ANSWER_WORDS)  # shape, color, direction, count


@dataclasses.dataclass(frozen=True)
class Answer:
    """One question asked on one path, and its grade."""

    path: str  # chat-video | chat-image | multipart
    medium: str  # video | image
    seed: int
    kind: str  # shape | color | direction | count
    question: str
    truth: str  # the answer word (direction: the true, forward direction even for reversed videos)
    reply: str
    correct: bool
    moving: bool | None  # direction questions: whether the object moves (None for other kinds)
    error: str | None = None  # the request failed (counted as wrong)


@dataclasses.dataclass(frozen=True)
class Drawing:
    """One image-generation prompt and what the classifier saw in the image."""

    prompt: str
    color: str
    shape: str
    seed: int
    seen_color: str | None  # None: no clear single object (or the request failed)
    seen_shape: str | None
    error: str | None = None

    @property
    def color_ok(self) -> bool:
        return self.seen_color == self.color

    @property
    def shape_ok(self) -> bool:
        return self.seen_shape == self.shape


def _score(hits: int, total: int) -> dict[str, Any]:
    return {"correct": hits, "total": total, "accuracy": hits / total if total else None}


def _tally(answers: list[Answer]) -> dict[str, Any]:
    return _score(sum(a.correct for a in answers), len(answers))


def _said(a: Answer) -> str:
    if a.error is not None:
        return "(error)"
    words = questions.answer_words(a.kind, a.reply)
    return words[0] if len(words) == 1 else "(no answer word)" if not words else "(several)"


@dataclasses.dataclass
class EvalReport:
    model: str
    answers: list[Answer]
    drawings: list[Drawing]
    settings: dict[str, Any]
    wall_s: float

    def select(self, *, path: str | None = None, kind: str | None = None,
               moving: bool | None = None) -> list[Answer]:
        return [a for a in self.answers if (path is None or a.path == path) and (kind is None or a.kind == kind)
                and (moving is None or a.moving is moving)]

    def accuracy(self, **where: Any) -> float | None:
        """Share of correct answers among `select(**where)` (None when there are none)."""
        return _tally(self.select(**where))["accuracy"]

    def mistakes(self, top: int = 5) -> dict[str, list[dict[str, Any]]]:
        """Per kind, the most frequent (truth, what was said) confusions."""
        out = {}
        for kind in KINDS:
            wrong = collections.Counter((a.truth, _said(a)) for a in self.select(kind=kind) if not a.correct)
            out[kind] = [{"truth": t, "said": s, "count": n} for (t, s), n in wrong.most_common(top)]
        return out

    def summary(self) -> dict[str, Any]:
        """Everything as JSON-able data: scores by kind, by path, by path x kind, direction on
        moving / still objects, mistakes, errors, image-generation agreement."""
        paths = list(dict.fromkeys(a.path for a in self.answers))
        errors = [a for a in self.answers if a.error] + [d for d in self.drawings if d.error]  # type: ignore[misc]
        wrong = [a for a in self.answers if not a.correct and a.error is None]
        return {
            "model": self.model,
            "settings": self.settings,
            "wall_s": self.wall_s,
            "questions": len(self.answers),
            "overall": _tally(self.answers),
            "by_kind": {k: _tally(self.select(kind=k)) for k in KINDS},
            "by_path": {p: _tally(self.select(path=p)) for p in paths},
            "by_path_kind": {p: {k: _tally(self.select(path=p, kind=k)) for k in KINDS} for p in paths},
            "direction_moving": _tally(self.select(kind="direction", moving=True)),
            "direction_still": _tally(self.select(kind="direction", moving=False)),
            "mistakes": self.mistakes(),
            "wrong_examples": [{"path": a.path, "seed": a.seed, "question": a.question, "truth": a.truth,
                                "reply": a.reply} for a in wrong[:5]],
            "errors": len(errors),
            "error_examples": sorted({str(e.error) for e in errors})[:3],
            "generation": self._generation(),
        }

    def _generation(self) -> dict[str, Any]:
        d = self.drawings
        return {"prompts": len(d),
                "color": _score(sum(x.color_ok for x in d), len(d)),
                "shape": _score(sum(x.shape_ok for x in d), len(d)),
                "both": _score(sum(x.color_ok and x.shape_ok for x in d), len(d)),
                "no_single_object": sum(x.seen_color is None and x.error is None for x in d)}


def _pct(score: dict[str, Any]) -> str:
    if not score["total"]:
        return "-"
    return f"{100 * score['accuracy']:.1f}% ({score['correct']}/{score['total']})"


def format_summary(s: dict[str, Any]) -> str:
    """A readable table of `EvalReport.summary()`."""
    st = s["settings"]
    lines = [f"model {s['model']}: {st['videos']} videos, {st['images']} images (held-out seeds from offset "
             f"{st['offset']}), {s['questions']} questions, {s['generation']['prompts']} image prompts, "
             f"{s['wall_s']:.1f} s" + (", videos REVERSED" if st["reverse"] else "")
             + (f", frames through {st['frame_transform']}" if st["frame_transform"] else "")]
    paths = list(s["by_path"])
    width = max([len(p) for p in paths] + [9])
    lines.append(f"{'kind':<10} {'all paths':>22} " + " ".join(f"{p:>{max(width, 22)}}" for p in paths))
    for kind in KINDS:
        cells = [_pct(s["by_path_kind"][p][kind]) for p in paths]
        lines.append(f"{kind:<10} {_pct(s['by_kind'][kind]):>22} " + " ".join(f"{c:>{max(width, 22)}}" for c in cells))
    lines.append(f"{'all':<10} {_pct(s['overall']):>22} " + " ".join(f"{_pct(s['by_path'][p]):>{max(width, 22)}}"
                                                                  for p in paths))
    lines.append(f"direction on moving objects {_pct(s['direction_moving'])}, on still ones {_pct(s['direction_still'])}")
    for kind, rows in s["mistakes"].items():
        if rows:
            lines.append(f"mistakes ({kind}): " + ", ".join(f"{r['truth']} -> {r['said']} x{r['count']}" for r in rows))
    for ex in s["wrong_examples"][:3]:
        lines.append(f"  e.g. [{ex['path']}] {ex['question']!r} (truth {ex['truth']}): {ex['reply']!r}")
    if s["errors"]:
        lines.append(f"ERRORS: {s['errors']} requests failed, e.g. " + "; ".join(s["error_examples"]))
    g = s["generation"]
    if g["prompts"]:
        lines.append(f"image generation, classifier agrees with the prompt: colour {_pct(g['color'])}, shape "
                     f"{_pct(g['shape'])}, both {_pct(g['both'])}; no single object recognised in "
                     f"{g['no_single_object']}")
    return "\n".join(lines)
