"""Video ingestion: decode (per strategy) + preprocess + VQGAN encode, and the cache.

Generates a 640x360 30 fps H.264 clip (moving patterns, x264 ultrafast, a
keyframe every 2 s), then measures, at 1 frame/s sampling:
  - decode frames/s for each strategy (full, seek, keyframe) and the packet scan;
  - preprocessing (resize + crop + scale) frames/s;
  - VQGAN encode seconds per frame at the REAL LWM size (default config, random
    params), batch 1, 2, 4 and 8, next to the measured fp32 matmul roof of this machine
    (the server measures the same at start-up and keeps the fastest: tokenizers/vqgan_batch.py);
  - each stage's share of ingest time, projected to a 1-hour video;
  - a real first ask (decode + preprocess + VQGAN through the cache, the VQGAN split
    into the sizes measured above, as the server does) on the first `--e2e-seconds` of
    the clip, then the same ask again (cache hit).

Usage: .venv/bin/python bench/ingest.py --minutes 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from lwm_serve.tokenizers import media_decode as md  # noqa: E402
from lwm_serve.tokenizers import media_ingest
from lwm_serve.tokenizers import vision_cache as vc
from lwm_serve.tokenizers import vqgan as vq
from lwm_serve.tokenizers import vqgan_batch as vqb
from lwm_serve.tokenizers.frame_sampling import SamplingSpec

W, H, FPS, GOP_S = 640, 360, 30, 2


def make_clip(path: Path, minutes: float) -> int:
    """Write the synthetic clip; returns its frame count."""
    n = int(round(minutes * 60 * FPS))
    period = 2 * W
    x = np.linspace(0, 4 * np.pi, period + W, dtype=np.float32)
    y = np.linspace(0, np.pi, H, dtype=np.float32)[:, None]
    base = np.stack(
        [127 + 100 * np.sin(x + y), 127 + 100 * np.sin(0.5 * x - 2 * y), 127 + 100 * np.cos(0.3 * x + y)], -1
    ).astype(np.uint8)  # [H, 2W + W, 3]: slide a window across it
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        g = str(GOP_S * FPS)
        s.options = {"preset": "ultrafast", "crf": "23", "g": g, "keyint_min": g, "sc_threshold": "0"}
        for i in range(n):
            frame = np.ascontiguousarray(base[:, (4 * i) % period : (4 * i) % period + W])
            bx, by = (7 * i) % (W - 64), (3 * i) % (H - 64)
            frame[by : by + 64, bx : bx + 64] = (i * 5) % 256  # a moving square
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return n


def timed(fn, *args, repeat: int = 1, **kwargs):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best, out


def matmul_roof(n: int = 2048, iters: int = 10) -> float:
    """fp32 matmul GFLOP/s measured now (the roof for conv-heavy VQGAN work)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t, _ = timed(lambda: f(a).block_until_ready(), repeat=iters)
    return 2 * n**3 / t / 1e9


def vqgan_rates(model_params, cfg: vq.VQGANConfig, batches=(1, 2, 4, 8)) -> dict:
    """Encode frames/s per batch size at the given config (compile excluded)."""
    flops_per_frame = None
    out = {}
    for b in batches:
        x = jnp.asarray(np.random.default_rng(b).uniform(-1, 1, (b, cfg.resolution, cfg.resolution, 3)), jnp.float32)
        compiled = vq.encode.lower(model_params, cfg, x).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            flops_per_frame = cost["flops"] / b
        jax.block_until_ready(compiled(model_params, x))  # warm
        reps = 3 if b == 1 else 2  # best of: the host is shared and noisy
        t, _ = timed(lambda: jax.block_until_ready(compiled(model_params, x)), repeat=reps)
        out[b] = b / t
    return {"frames_per_s": out, "flops_per_frame": flops_per_frame}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="clip length (default 10)")
    ap.add_argument("--fps-sample", type=float, default=1.0, help="sampling rate in frames/s (default 1)")
    ap.add_argument("--e2e-seconds", type=float, default=8.0,
                    help="video seconds in the real first/second ask through the cache (default 8: one batch of 8)")
    ap.add_argument("--clip", type=Path, help="reuse/keep the clip at this path instead of a temp dir")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lwm-ingest-") as tmp:
        tmp = Path(tmp)
        clip = args.clip or tmp / "clip.mp4"
        if not clip.exists():
            t_gen, n_frames = timed(make_clip, clip, args.minutes)
            print(f"generated {clip.name}: {n_frames} frames {W}x{H}@{FPS} in {t_gen:.1f} s "
                  f"({clip.stat().st_size / 1e6:.1f} MB)", flush=True)
        info = md.probe_video(clip)
        video_s = info.duration_s
        spec = SamplingSpec(max_frames=None, fps=args.fps_sample)

        # --- decode, per strategy
        t_scan, timeline = timed(md.frame_timeline, clip)
        decode = {}
        kept = None
        for strategy in md.STRATEGIES:
            t, frames = timed(md.decode_video, clip, spec, strategy)
            decode[strategy] = {"s": t, "kept_frames_per_s": len(frames) / t, "x_realtime": video_s / t}
            if kept is None:
                kept = frames
            print(f"  decode {strategy:8s} {t:7.2f} s  {len(frames) / t:8.1f} kept frames/s  "
                  f"{video_s / t:7.1f}x realtime", flush=True)
        n_kept = len(kept)
        best = min(decode, key=lambda s: decode[s]["s"])

        # --- preprocess
        t_pre, _ = timed(md.preprocess_frames, [f for _, f in kept])
        pre_fps = n_kept / t_pre

        # --- VQGAN at the real size
        cfg = vq.VQGANConfig()
        params = jax.device_put(vq.init_params(cfg, seed=0))
        roof = matmul_roof()
        vr = vqgan_rates(params, cfg)
        roof = max(roof, matmul_roof())  # best of before/after: the shared host is noisy
        vq_fps = vr["frames_per_s"]
        gflop_frame = (vr["flops_per_frame"] or 0) / 1e9
        for b, f in vq_fps.items():
            print(f"  vqgan  batch {b}: {1 / f:.2f} s/frame = {f:.2f} frames/s = {f * gflop_frame:.0f} GFLOP/s "
                  f"({gflop_frame:.1f} GFLOP/frame; matmul roof {roof:.0f} GFLOP/s)", flush=True)

        # --- stage shares for the whole clip (measured decode, rates for the rest)
        # the server's rule (tokenizers/vqgan_batch.py): the least time per frame, a larger batch
        # only when it wins by 5% (on CPU batch 1 can win: cache-sized activations)
        best_batch = vqb.best_batch({b: b / f for b, f in vq_fps.items()})
        stage_s = {"decode": decode[best]["s"], "preprocess": n_kept / pre_fps, "vqgan": n_kept / vq_fps[best_batch]}
        total = sum(stage_s.values())
        per_hour = {k: v * 3600 / video_s for k, v in stage_s.items()}

        # --- a real ask through the cache, twice
        model = vq.VQGAN(jax.device_get(params), cfg, batch_size=best_batch)
        model.encode_seconds = {b: b / f for b, f in vq_fps.items()}  # what the server's start-up probe keeps
        vqb.compile_encode(model, vq_fps)  # compiled and run once, as the server's warm-up leaves them
        cache = vc.VisionCache(tmp / "cache")
        # end is inclusive: stop just before the frame at e2e_seconds so 8 s -> 8 frames at 1 frame/s
        e2e_spec = SamplingSpec(max_frames=None, fps=args.fps_sample, end=max(0.0, args.e2e_seconds - 1e-3))
        t_first, (codes, _) = timed(media_ingest.encode_media, clip, e2e_spec, model, cache)
        t_second, (codes2, _) = timed(media_ingest.encode_media, clip, e2e_spec, model, cache)
        assert np.array_equal(codes, codes2)
        t_hash, _ = timed(vc.media_sha256, clip)

    device = jax.devices()[0]
    achieved = vq_fps[best_batch] * gflop_frame
    rows = [
        ("clip", f"{args.minutes:g} min {W}x{H}@{FPS} H.264, keyframe every {GOP_S} s, {len(timeline.pts)} frames"),
        ("sampling", f"{args.fps_sample:g} frame/s -> {n_kept} frames"),
        ("packet scan (in every strategy)", f"{t_scan:.2f} s ({len(timeline.pts) / t_scan:,.0f} packets/s)"),
        *[(f"decode {s}",
           f"{d['s']:.2f} s = {d['kept_frames_per_s']:.1f} kept frames/s = {d['x_realtime']:.1f}x realtime")
          for s, d in decode.items()],
        ("preprocess", f"{pre_fps:.1f} frames/s"),
        *[(f"vqgan encode batch {b}", f"{1 / f:.2f} s/frame = {f:.2f} frames/s = {f * gflop_frame / roof:.0%} of roof "
           f"(reference vision_chat: 2.1-2.2 s/frame, batch 1)") for b, f in vq_fps.items()],
        ("vqgan achieved vs roof", f"{achieved:.0f} / {roof:.0f} GFLOP/s = {achieved / roof:.0%} (batch {best_batch})"),
        *[(f"share {k}", f"{v / total:.1%}") for k, v in stage_s.items()],
        ("1-hour video projection", ", ".join(f"{k} {v / 60:.1f} min" for k, v in per_hour.items())
         + f"; total {sum(per_hour.values()) / 60:.1f} min ({3600 * args.fps_sample:.0f} frames)"),
        (f"first ask ({args.e2e_seconds:g} s, {len(codes)} frames)", f"{t_first:.2f} s"),
        ("second ask (cache hit)", f"{t_second:.3f} s (of which content hash {t_hash:.3f} s) "
                                   f"= {t_first / t_second:.0f}x faster"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\ningest on {device.platform}:{device.device_kind} ({os.cpu_count()} CPUs), git {roofline.git_sha()}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(json.dumps({
        "bench": "ingest",
        "device": f"{device.platform}:{device.device_kind}",
        "n_devices": jax.device_count(),
        "git_sha": roofline.git_sha(),
        "config": {"clip_minutes": args.minutes, "width": W, "height": H, "fps": FPS, "gop_s": GOP_S,
                   "sample_fps": args.fps_sample, "vqgan": cfg.to_dict()},
        "figures": {
            "packet_scan_s": t_scan,
            "decode": decode,
            "best_strategy": best,
            "preprocess_frames_per_s": pre_fps,
            "vqgan_frames_per_s": {str(k): v for k, v in vq_fps.items()},
            "vqgan_s_per_frame": {str(k): 1 / v for k, v in vq_fps.items()},
            "vqgan_gflop_per_frame": gflop_frame,
            "vqgan_best_batch": best_batch,
            "vqgan_achieved_gflops": achieved,
            "matmul_roof_gflops": roof,
            "vqgan_roof_ratio": achieved / roof,
            "stage_share": {k: v / total for k, v in stage_s.items()},
            "hour_projection_s": per_hour,
            "first_ask_s": t_first,
            "cached_ask_s": t_second,
            "cache_speedup": t_first / t_second,
        },
    }))


if __name__ == "__main__":
    sys.exit(main())
