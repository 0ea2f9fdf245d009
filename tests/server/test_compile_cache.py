"""The persistent compilation cache: where it lives, that it can be turned off, that it fills."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lwm_serve.server.app import use_compile_cache
from lwm_serve.server.config import ServerSettings


def test_the_cache_dir_defaults_under_the_home_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.delenv("LWM_SERVE_COMPILE_CACHE_DIR", raising=False)
    monkeypatch.setenv("LWM_SERVE_HOME", str(tmp_path))
    assert ServerSettings().resolved_compile_cache_dir() == tmp_path / "compile-cache"
    assert ServerSettings(compile_cache_dir=tmp_path / "x").resolved_compile_cache_dir() == tmp_path / "x"
    assert ServerSettings(compile_cache=False).resolved_compile_cache_dir() is None


def test_compiled_programs_land_in_the_cache_dir(tmp_path):
    jax.jit(lambda x: x + 1)(1.0)  # a compile before the cache is set (as the tests' own are)
    before = jax.config.jax_compilation_cache_dir
    try:
        use_compile_cache(tmp_path / "cc")
        # a program no other test compiles (its shape is odd), so it cannot already be cached
        out = jax.jit(lambda x: jnp.cumsum(x * 3.5) - 1)(np.arange(777, dtype=np.float32))
        assert float(out[-1]) == float(np.cumsum(np.arange(777, dtype=np.float32) * 3.5)[-1] - 1)
        assert any(p.is_file() for p in Path(tmp_path / "cc").rglob("*")), os.listdir(tmp_path / "cc")
    finally:
        if before:
            use_compile_cache(Path(before))
