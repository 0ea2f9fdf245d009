"""`lwm-serve`: serve (default) | generate | plan | train-nano.

    lwm-serve                                   # serve the embedded demo model on 127.0.0.1:8000
    lwm-serve serve --model params::/ckpt/params --model-config config.json --tokenizer tok/
    lwm-serve generate "What is a world model?" --max-tokens 32
    lwm-serve plan ...                          # memory planner (model/planner.py)
    lwm-serve train-nano --out lwm-nano         # reproduce LWM-Nano's weights (nano/train.py)

Every serve/generate flag is also an environment variable: `--max-model-len` is
`LWM_SERVE_MAX_MODEL_LEN`, `--api-key` is `LWM_SERVE_API_KEYS` (comma-separated)
or `LWM_SERVE_API_KEY`, `--media-url-allowlist` (repeatable) is
`LWM_SERVE_MEDIA_URL_ALLOWLIST` (comma-separated). Flags win over the
environment. Logging is configured here, once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any, Sequence

import uvicorn
from pydantic import ValidationError

logger = logging.getLogger(__name__)

COMMANDS = ("serve", "generate", "plan", "train-nano")
PROG = "lwm-serve"

def _optional(kind: type) -> Any:
    """argparse type: a `kind` value, or None for "none" (a setting whose unset means "no limit")."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


# (flag, settings field, argparse kwargs); help comes from the field's description.
_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {}),
    ("--model-config", "model_config_path", {}),
    ("--tokenizer", "tokenizer", {}),
    ("--vqgan", "vqgan", {}),
    ("--served-model-name", "served_model_name", {}),
    ("--dtype", "dtype", {"choices": ["float32", "bfloat16"]}),
    ("--mesh", "mesh", {}),
    ("--max-model-len", "max_model_len", {"type": int}),
    ("--prefill-chunk", "prefill_chunk", {"type": int}),
    ("--load-format", "load_format", {"choices": ["auto", "dummy"]}),
    ("--log-level", "log_level", {"choices": ["debug", "info", "warning", "error", "critical"]}),
]
_SERVE_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--host", "host", {}),
    ("--port", "port", {"type": int}),
    ("--api-key", "api_keys", {"action": "append", "metavar": "KEY"}),
    ("--cors-origin", "cors_origins", {"action": "append", "metavar": "ORIGIN"}),
    ("--max-queue", "max_queue", {"type": int}),
    ("--max-batch", "max_batch", {"type": int}),
    ("--default-max-tokens", "default_max_tokens", {"type": int}),
    ("--warmup", "warmup", {"action": argparse.BooleanOptionalAction}),
    ("--compile-cache", "compile_cache", {"action": argparse.BooleanOptionalAction}),
    ("--compile-cache-dir", "compile_cache_dir", {"metavar": "DIR"}),
    ("--max-num-seqs", "max_num_seqs", {"type": int}),
    ("--kv-cache-bytes", "kv_cache_bytes", {"type": _optional(int), "metavar": "BYTES|none"}),
    ("--prefix-cache-bytes", "prefix_cache_bytes", {"type": int, "metavar": "BYTES"}),
    ("--request-timeout", "request_timeout_s", {"type": _optional(float), "metavar": "SECONDS|none"}),
    ("--playground", "playground", {"action": argparse.BooleanOptionalAction}),
]
_DEPLOY_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--accelerator", "accelerator", {"choices": ["auto", "cpu", "gpu", "tpu"]}),
    ("--coordinator", "coordinator", {"metavar": "HOST:PORT"}),
    ("--num-processes", "num_processes", {"type": int, "metavar": "N"}),
    ("--process-id", "process_id", {"type": int, "metavar": "I"}),
    ("--distributed", "distributed", {"action": argparse.BooleanOptionalAction}),
    ("--heartbeat-timeout", "heartbeat_timeout_s", {"type": int, "metavar": "SECONDS"}),
]


_MEDIA_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--data-dir", "data_dir", {"metavar": "DIR"}),
    ("--max-upload-bytes", "max_upload_bytes", {"type": int, "metavar": "BYTES"}),
    ("--max-video-seconds", "max_video_seconds", {"type": _optional(float), "metavar": "SECONDS|none"}),
    ("--max-media-pixels", "max_media_pixels", {"type": _optional(int), "metavar": "PIXELS|none"}),
    ("--media-url-allowlist", "media_url_allowlist", {"action": "append", "metavar": "DOMAIN"}),
    ("--frame-layout", "frame_layout", {"choices": ["standard", "vision_chat"]}),
    ("--auto-fps", "auto_fps", {"action": argparse.BooleanOptionalAction}),
    ("--vision-cache-bytes", "vision_cache_bytes", {"type": _optional(int), "metavar": "BYTES|none"}),
    ("--image-url-ttl", "image_url_ttl_s", {"type": float, "metavar": "SECONDS"}),
    ("--vqgan-batch", "vqgan_batch", {"type": _optional(int), "metavar": "FRAMES|none"}),
]


def _add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
               flags: list[tuple[str, str, dict[str, Any]]]) -> None:
    from lwm_serve.server.config import ENV_PREFIX, ServerSettings

    for flag, field, kwargs in flags:
        info = ServerSettings.model_fields[field]
        env = ENV_PREFIX + field.upper()
        default = info.default if info.default_factory is None else info.default_factory()
        help_text = f"{info.description or ''} [env {env}; default {default!r}]"
        parser.add_argument(flag, dest=field, default=argparse.SUPPRESS, help=help_text, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="OpenAI-compatible server for the Large World Model (LWM). "
        "Without a command, runs `serve`.", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{serve,generate,plan,train-nano}")
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API (default)")
    _add_flags(serve, _FLAGS + _SERVE_FLAGS)
    _add_flags(serve.add_argument_group("images and video"), _MEDIA_FLAGS)
    _add_flags(serve.add_argument_group("accelerator and multi-host"), _DEPLOY_FLAGS)
    gen = sub.add_parser("generate", help="print a completion from the loaded model (offline)")
    gen.add_argument("prompt", help="the user message (or the raw prompt with --raw)")
    _add_flags(gen, _FLAGS)
    gen.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="complete the raw prompt instead of a chat turn")
    sub.add_parser("plan", help="memory planner: does a model fit a mesh? (see `lwm-serve plan --help`)",
                   add_help=False)
    sub.add_parser("train-nano", help="train LWM-Nano from nothing (see `lwm-serve train-nano --help`)",
                   add_help=False)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)


def _settings(args: argparse.Namespace, skip: Sequence[str]) -> Any:
    from lwm_serve.server.config import ServerSettings

    values = {k: v for k, v in vars(args).items() if k != "command" and k not in skip}
    return ServerSettings(**values)


def _settings_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        lines.append(f"  {where}: {err.get('msg', '')}".replace("Value error, ", ""))
    return "invalid settings:\n" + "\n".join(lines)


class StartupError(ValueError):
    """The processes or devices this run found cannot serve as configured."""


def start_devices(settings: Any) -> None:
    """Join the multi-host run (if any) and check the platform, before any mesh is built.

    Raises:
        StartupError: `--accelerator tpu|gpu` while JAX runs on another platform.
    """
    import jax

    from lwm_serve.model.mesh import maybe_initialize_distributed

    maybe_initialize_distributed(coordinator_address=settings.coordinator,
                                 num_processes=settings.num_processes,
                                 process_id=settings.process_id, force=settings.distributed,
                                 heartbeat_timeout_s=settings.heartbeat_timeout_s)
    _check_accelerator(settings.accelerator, jax.default_backend())
    if jax.process_count() > 1:
        logger.info("multi-host run: this is process %d of %d (%d devices in all, %d here); %s",
                    jax.process_index(), jax.process_count(), jax.device_count(), jax.local_device_count(),
                    "it serves HTTP" if jax.process_index() == 0 else "it follows process 0's steps")


def _check_accelerator(wanted: str, backend: str) -> None:
    import importlib.util

    if wanted in ("gpu", "tpu") and backend != wanted:
        raise StartupError(
            f"--accelerator {wanted} was asked for, but JAX runs on {backend!r}: the {wanted} is not "
            "visible (TPU VM: run the container with --privileged --net=host; GPU: --gpus all / a "
            "device reservation) or the image lacks jax's plugin (JAX_EXTRA). Pass --accelerator "
            f"auto (env {_env('accelerator')}) to run on {backend} anyway")
    if wanted == "cpu" and backend != "cpu":
        raise StartupError(f"--accelerator cpu was asked for, but JAX runs on {backend!r} "
                           "(set JAX_PLATFORMS=cpu)")
    plugins = [m for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin")
               if importlib.util.find_spec(m) is not None]
    if wanted == "auto" and backend == "cpu" and plugins:
        logger.warning("!!! JAX FELL BACK TO CPU although %s is installed: the accelerator is not "
                       "visible to this process; a 7B model on CPU is unusably slow. Pass "
                       "--accelerator tpu|gpu to refuse to start in this case !!!", ", ".join(plugins))


def _process_count() -> int:
    import jax

    return jax.process_count()


def _env(field: str) -> str:
    from lwm_serve.server.config import ENV_PREFIX

    return ENV_PREFIX + field.upper()


def _load(settings: Any) -> Any:
    from lwm_serve.server.app import load_runtime_for

    logger.info("loading model %r (tokenizer %s, dtype %s, mesh %s)", settings.model,
                settings.tokenizer or "default", settings.dtype, settings.mesh)
    return load_runtime_for(settings, progress=True)


def serve(settings: Any) -> int:
    import uvicorn

    from lwm_serve.server.app import build_app

    start_devices(settings)
    if _is_follower():
        from lwm_serve.server.follower import follow

        return follow(settings)
    runtime = _load(settings)  # before binding the port: a bad model fails fast, clearly
    runtime.replica = _leader_link()
    app = build_app(settings, runtime)
    logger.info("listening on http://%s:%d (auth %s)", settings.host, settings.port,
                "on" if settings.accepted_keys else "off")
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level, timeout_graceful_shutdown=DRAIN_TIMEOUT_S)
    try:
        DrainingServer(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it is done (as uvicorn.run)
        pass
    return 0


def _is_follower() -> bool:
    import jax

    return jax.process_count() > 1 and jax.process_index() != 0


def _leader_link() -> Any:
    """Process 0 of a multi-host run: the link its engine replays through (else None)."""
    import jax

    if jax.process_count() == 1:
        return None
    from lwm_serve.server.engine.replica import Leader

    return Leader()


DRAIN_TIMEOUT_S = 30


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: /ready turns false and new requests get 503 at once, while
    uvicorn lets in-flight streams finish (at most DRAIN_TIMEOUT_S) before the engine
    stops."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        app = self.config.app
        services = getattr(app.state, "services", None)
        if services is not None and not services.engine.draining:
            services.engine.drain()
        app.state.ready = False
        super().handle_exit(sig, frame)


def generate(settings: Any, args: argparse.Namespace) -> int:
    from lwm_serve.server.schemas.chat import ChatCompletionRequest
    from lwm_serve.server.schemas.completions import CompletionRequest
    from lwm_serve.server.services import build_services

    start_devices(settings)
    if _process_count() > 1:
        raise StartupError("`generate` runs on one host; use `serve` for a multi-host run")
    services = build_services(settings, _load(settings))
    services.engine.start()
    knobs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, seed=args.seed, stop=args.stop, stream=True)

    async def run() -> None:
        if args.raw:
            chunks = await services.completions.create(CompletionRequest(prompt=args.prompt, **knobs))
        else:
            chunks = await services.chat.create(ChatCompletionRequest(
                messages=[{"role": "user", "content": args.prompt}], **knobs))
        async for chunk in chunks:  # type: ignore[union-attr]
            if not isinstance(chunk, dict):  # progress comments
                continue
            for choice in chunk["choices"]:
                text = choice["text"] if args.raw else choice["delta"].get("content", "")
                print(text, end="", flush=True)
        print()

    try:
        asyncio.run(run())
    finally:
        services.engine.stop()
    return 0


def plan(argv: list[str]) -> int:
    try:
        from lwm_serve.model import planner
    except ImportError:
        print(f"{PROG} plan: the memory planner (lwm_serve.model.planner) is not available in this "
              "installation", file=sys.stderr)
        return 2
    result = planner.main(argv)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lwm-serve`; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["train-nano"]:
        from lwm_serve.nano import train as nano_train

        return nano_train.main(args_list[1:])
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help")):
        args_list = ["serve", *args_list]
    if args_list[0] == "plan":
        return plan(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    gen_only = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "raw")
    try:
        settings = _settings(args, skip=gen_only)
    except ValidationError as exc:
        parser.exit(2, f"{PROG}: error: {_settings_error(exc)}\n")
    configure_logging(settings.log_level)
    try:
        if args.command == "generate":
            return generate(settings, args)
        return serve(settings)
    except (ValueError, OSError) as exc:
        # LoadError, CheckpointError, TokenizerError, MeshSpecError, vocab mismatch...
        # are ValueErrors with a message meant for the operator.
        logger.debug("startup failed", exc_info=exc)
        print(f"{PROG}: cannot start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
