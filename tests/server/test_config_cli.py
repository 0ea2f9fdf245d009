"""ServerSettings (env + flags, refusals at start) and the lwm-serve CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from pydantic import ValidationError

from lwm_serve.server import cli
from lwm_serve.server.config import ServerSettings


def test_env_vars_and_flag_precedence(monkeypatch):
    monkeypatch.setenv("LWM_SERVE_PORT", "9123")
    monkeypatch.setenv("LWM_SERVE_MAX_QUEUE", "3")
    monkeypatch.setenv("LWM_SERVE_API_KEYS", "k1, k2")
    monkeypatch.setenv("LWM_SERVE_API_KEY", "k3")
    monkeypatch.setenv("LWM_SERVE_MESH", "1,1,2,-1")
    s = ServerSettings()
    assert (s.port, s.max_queue, s.mesh, s.mesh_size) == (9123, 3, "1,1,2,-1", None)
    assert s.accepted_keys == {"k1", "k2", "k3"}
    assert ServerSettings(port=8001).port == 8001  # explicit (CLI) values win
    monkeypatch.setenv("LWM_SERVE_API_KEYS", '["j1"]')
    assert ServerSettings().api_keys == ["j1"]


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(mesh="1,1,1"), "4"),
    (dict(mesh="1,-1,-1,1"), "-1"),
    (dict(model="params::/no/such/file"), "does not exist"),
    (dict(model="/no/such/dir"), "neither"),
    (dict(model_config_path="no-such-preset"), "preset"),
    (dict(tokenizer="/no/such/tokenizer"), "tokenizer"),
    (dict(dtype="float64"), "dtype"),
    (dict(port=70000), "port"),
    (dict(max_queue=0), "max_queue"),
    (dict(unknown_setting=1), "unknown_setting"),
])
def test_bad_settings_are_refused(kwargs, fragment):
    with pytest.raises(ValidationError) as info:
        ServerSettings(**kwargs)
    assert fragment in str(info.value)


def test_cli_refuses_bad_flags_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--mesh", "1,2", "--port", "0"])  # no command: serve
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "mesh" in err and "4" in err


def test_cli_refuses_a_vocab_mismatch(reference_dir, tmp_path, capsys):
    raw = json.loads((reference_dir / "model" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "vocab_size": 512}))
    shutil.copy(reference_dir / "model" / "params_scan", tmp_path / "params")
    code = cli.main(["serve", "--model", f"params::{tmp_path / 'params'}",
                     "--tokenizer", str(reference_dir / "tokenizer"), "--log-level", "error"])
    assert code == 1
    assert "cannot start" in capsys.readouterr().err


def test_cli_generate_prints_the_greedy_answer(reference_dir, capsys, fixture_runtime, tmp_path, monkeypatch):
    from lwm_serve.model.generation import PromptRow, seed_key

    monkeypatch.setenv("LWM_SERVE_DATA_DIR", str(tmp_path))  # the services' file store: never ~/.cache
    from lwm_serve.model.sampling import SamplingParams
    from lwm_serve.tokenizers.chat_template import chat_prompt

    code = cli.main(["generate", "Hello there", "--model", f"params::{reference_dir / 'model' / 'params_scan'}",
                     "--tokenizer", str(reference_dir / "tokenizer"), "--max-tokens", "6",
                     "--log-level", "error"])
    assert code == 0
    tok = fixture_runtime.tokenizer
    ids = chat_prompt(tok, "Hello there").ids
    direct = fixture_runtime.generator.generate([PromptRow(ids)], SamplingParams(temperature=0), max_new_tokens=6,
                                                key=seed_key(0), stop_token_ids=[tok.eos_id])[0]
    assert capsys.readouterr().out == tok.decode(direct, skip_special_tokens=True) + "\n"


def test_plan_command_reports_fit_and_misfit(capsys):
    """`lwm-serve plan` (the issue's example) runs the capacity planner."""
    assert cli.main(["plan", "--model", "7b", "--mesh", "1,1,4,64", "--dtype", "bf16",
                     "--context", "1048576"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "KV cache" in out
    assert cli.main(["plan", "--model", "7b", "--mesh", "1,1,1,8", "--dtype", "bf16",
                     "--context", "1048576", "--device-memory", "32GiB"]) != 0
    assert "fits: NO" in capsys.readouterr().out


def test_help_lists_every_setting_with_its_env_var(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag, env in (("--max-model-len", "LWM_SERVE_MAX_MODEL_LEN"), ("--api-key", "LWM_SERVE_API_KEYS"),
                      ("--model-config", "LWM_SERVE_MODEL_CONFIG_PATH"), ("--mesh", "LWM_SERVE_MESH")):
        assert flag in out and env in out
    # Every flag is a setting: its env var and the start of its description are in the help.
    flat = " ".join(out.split())
    for flag, field, _ in cli._FLAGS + cli._SERVE_FLAGS + cli._MEDIA_FLAGS:
        description = " ".join((ServerSettings.model_fields[field].description or "").split())
        assert flag in flat and f"LWM_SERVE_{field.upper()}" in flat and description[:40] in flat, flag
    for flag in ("--data-dir", "--max-upload-bytes", "--max-video-seconds", "--media-url-allowlist",
                 "--frame-layout", "--auto-fps", "--no-auto-fps", "--vision-cache-bytes"):
        assert flag in flat


def _served_settings(monkeypatch, argv: list[str]) -> ServerSettings:
    served = []
    monkeypatch.setattr(cli, "serve", lambda settings: served.append(settings) or 0)
    assert cli.main(["serve", "--log-level", "warning", *argv]) == 0
    return served[0]


def test_media_flags_set_the_media_settings_and_win_over_the_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LWM_SERVE_MEDIA_URL_ALLOWLIST", "env.example")
    monkeypatch.setenv("LWM_SERVE_AUTO_FPS", "true")
    monkeypatch.setenv("LWM_SERVE_MAX_VIDEO_SECONDS", "60")
    s = _served_settings(monkeypatch, [])
    assert (s.media_url_allowlist, s.auto_fps, s.max_video_seconds) == (["env.example"], True, 60.0)
    s = _served_settings(monkeypatch, [
        "--data-dir", str(tmp_path), "--max-upload-bytes", "1048576", "--max-video-seconds", "7200",
        "--media-url-allowlist", "videos.example.com", "--media-url-allowlist", "cdn.example.org",
        "--frame-layout", "vision_chat", "--no-auto-fps", "--vision-cache-bytes", "4096"])
    assert s.resolved_data_dir() == tmp_path and s.max_upload_bytes == 1048576
    assert s.max_video_seconds == 7200.0 and s.vision_cache_bytes == 4096
    assert s.media_url_allowlist == ["videos.example.com", "cdn.example.org"]
    assert s.frame_layout == "vision_chat" and s.auto_fps is False
    s = _served_settings(monkeypatch, ["--max-video-seconds", "none", "--vision-cache-bytes", "None", "--auto-fps"])
    assert s.max_video_seconds is None and s.vision_cache_bytes is None and s.auto_fps is True


@pytest.mark.parametrize("argv,fragment", [
    (["--frame-layout", "sideways"], "invalid choice"),
    (["--max-upload-bytes", "lots"], "invalid int value"),
    (["--max-video-seconds", "-5"], "max_video_seconds"),
    (["--media-url-allowlist", "https://x.example/path"], "bare domains"),
])
def test_bad_media_flags_are_refused(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", *argv])
    assert info.value.code == 2 and fragment in capsys.readouterr().err
