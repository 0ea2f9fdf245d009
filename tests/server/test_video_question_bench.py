"""bench/video_question.py --quick: the real server process on the demo model, every row printed.

The bench's figures are not judged here (tests never assert wall-clock times); what is
checked is that each ask ran through the path it names (a fresh video is ingested, the
same one comes from the code cache, the follow-up reuses the prompt's prefill) and that
each split comes from the server's own reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "video_question.py"
ASKS = ("cold", "same_video", "new_video", "follow_up")
SPLITS = ("decode", "preprocess", "vqgan", "prefill", "generation", "other")


def test_quick_bench_prints_every_row_from_the_servers_own_figures(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--server-log", str(tmp_path / "server.log")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    lines = out.stdout.splitlines()
    for row in ("launch -> ready", "cold launch -> answer", *ASKS, "reference", "server's start-up VQGAN probe",
                "GFLOP/s vs matmul roof"):
        assert any(row in line for line in lines), (row, out.stdout)
    report = json.loads(lines[-1])
    figures = report["figures"]
    assert report["bench"] == "video_question" and report["config"]["quick"]
    assert 0 < figures["launch_to_ready_s"] < figures["cold_launch_to_answer_s"]
    asks = figures["asks"]
    assert set(asks) == set(ASKS)
    for name in ASKS:
        split = asks[name]["split_s"]
        assert set(split) == set(SPLITS)
        assert split["prefill"] > 0 and split["generation"] > 0, (name, split)
        assert asks[name]["completion_tokens"] == report["config"]["max_tokens"]  # ignore_eos
    for fresh in ("cold", "new_video"):  # ingested: the pipeline's own stage seconds
        a = asks[fresh]
        assert a["frames"] == report["config"]["frames"] and not a["codes_cached"]
        assert a["split_s"]["vqgan"] > 0 and a["ingest_s"] >= a["split_s"]["vqgan"]
    for again in ("same_video", "follow_up"):  # codes from the cache, prompt prefill reused
        a = asks[again]
        assert a["codes_cached"] and a["frames"] == 0 and a["split_s"]["vqgan"] == 0
        assert a["cached_tokens"] > 0
    # The batch the server chose is one it measured, and the measurement is in its log.
    assert str(figures["vqgan_batch"]) in figures["vqgan_probe_s_per_frame"]
    assert "VQGAN encode batch" in (tmp_path / "server.log").read_text()
