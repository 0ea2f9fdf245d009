"""How well the served model answers questions about LWM-Nano's world (and draws it).

Asks every applicable question about held-out videos and images of the world
(README, "LWM-Nano's world") through the API: chat completions with `video_url` /
`image_url` parts and the multipart POST /v1/video/questions; greedy, short answers,
graded by `nano.questions.grade`. Then draws images for "a {color} {shape}." prompts
and reads them back with `nano.classify`. Prints accuracy per question type and per
path, direction accuracy on moving objects, the commonest mistakes, and the
image-generation agreement; `--json` prints the whole summary as one JSON object.

    # against a running server
    .venv/bin/python bench/nano_eval.py --url http://127.0.0.1:8000 [--api-key KEY]
    # or start one here (any `lwm-serve serve` flag after --serve MODEL)
    .venv/bin/python bench/nano_eval.py --serve demo --videos 20 --images 20 --generations 10
    .venv/bin/python bench/nano_eval.py --serve demo --reverse -- --frame-layout vision_chat

Exit status: 0, or 1 when any request failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from lwm_serve.nano.eval_report import format_summary
from lwm_serve.nano.evaluate import PATHS, evaluate, off_centre
from lwm_serve.server.local import running_server

TRANSFORMS = {"off-centre": off_centre}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # an abbreviation could swallow a server flag
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server (e.g. http://127.0.0.1:8000)")
    where.add_argument("--serve", metavar="MODEL", help="start a server here on this --model spec (e.g. demo)")
    ap.add_argument("--api-key", default=None, help="bearer key (with --serve, the started server requires it)")
    ap.add_argument("--videos", type=int, default=20)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--generations", type=int, default=10, help="image-generation prompts")
    ap.add_argument("--offset", type=int, default=0, help="first held-out seed = HELD_OUT_SEED_BASE + offset")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--reverse", action="store_true", help="send every video with its frames reversed")
    ap.add_argument("--frame-transform", choices=sorted(TRANSFORMS), default=None,
                    help="change the frames before encoding (off-centre: a wrong crop)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args, server_flags = ap.parse_known_args(argv)
    server_flags = [f for f in server_flags if f != "--"]
    if server_flags and not args.serve:
        ap.error(f"unrecognized arguments: {' '.join(server_flags)} (server flags go with --serve)")
    served_here = " ".join([args.serve, *server_flags]) if args.serve else None  # (the key is not shown)
    if args.serve and args.api_key:
        server_flags += ["--api-key", args.api_key]  # the server started here asks for the same key
    logging.basicConfig(level=logging.WARNING)
    with contextlib.ExitStack() as stack:
        base = args.url or stack.enter_context(running_server(args.serve, server_flags))
        report = evaluate(base, api_key=args.api_key, videos=args.videos, images=args.images,
                          generations=args.generations, offset=args.offset,
                          paths=[p for p in args.paths.split(",") if p], reverse=args.reverse,
                          frame_transform=TRANSFORMS.get(args.frame_transform or ""),
                          max_tokens=args.max_tokens, concurrency=args.concurrency)
    summary = report.summary()
    summary["served_here"] = served_here
    if args.json:
        print(json.dumps(summary))
    else:
        if args.serve:
            print(f"server started here: --model {summary['served_here']}")
        print(format_summary(summary))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
