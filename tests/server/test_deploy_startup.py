"""Start-up of a deployment: multi-host flags, jax.distributed, accelerator checks.

Two real processes serving one run (flags and environment): tests/server/test_multihost.py.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
from pydantic import ValidationError

from lwm_serve.server import cli
from lwm_serve.server.config import ServerSettings


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(coordinator="10.0.0.2:8476"), "--num-processes, --process-id"),
    (dict(num_processes=2, process_id=0), "--coordinator"),
    (dict(coordinator="10.0.0.2", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator="10.0.0.2:99999", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator="10.0.0.2:8476", num_processes=2, process_id=2), "below --num-processes"),
    (dict(coordinator="10.0.0.2:8476", num_processes=2, process_id=0, distributed=False), "contradicts"),
    (dict(num_processes=0, coordinator="h:1", process_id=0), "num_processes"),
    (dict(accelerator="ipu"), "accelerator"),
])
def test_bad_multi_host_settings_are_refused(kwargs, fragment):
    with pytest.raises(ValidationError) as info:
        ServerSettings(**kwargs)
    assert fragment in str(info.value)


def test_multi_host_flags_and_env_reach_the_settings(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "serve", lambda settings: seen.append(settings) or 0)
    assert cli.main(["serve", "--coordinator", "10.0.0.2:8476", "--num-processes", "4",
                     "--process-id", "3", "--accelerator", "tpu", "--log-level", "error"]) == 0
    s = seen.pop()
    assert (s.coordinator, s.num_processes, s.process_id, s.accelerator) == ("10.0.0.2:8476", 4, 3, "tpu")
    monkeypatch.setenv("LWM_SERVE_DISTRIBUTED", "true")
    monkeypatch.setenv("LWM_SERVE_ACCELERATOR", "gpu")
    assert cli.main(["serve", "--log-level", "error"]) == 0
    s = seen.pop()
    assert (s.distributed, s.accelerator, s.coordinator) == (True, "gpu", None)
    assert cli.main(["serve", "--no-distributed", "--log-level", "error"]) == 0
    assert seen.pop().distributed is False


def test_asking_for_a_missing_accelerator_refuses_to_start(capsys, tmp_path, monkeypatch):
    """The CPU test machine plays a TPU VM whose container cannot see the chips."""
    monkeypatch.setenv("LWM_SERVE_HOME", str(tmp_path))
    code = cli.main(["serve", "--accelerator", "tpu", "--port", "0", "--log-level", "error"])
    err = capsys.readouterr().err
    assert code == 1
    assert "--accelerator tpu was asked for, but JAX runs on 'cpu'" in err and "--privileged" in err
    assert not (tmp_path / "demo-v1").exists()  # refused before loading anything


def test_auto_warns_loudly_when_a_plugin_is_installed_but_jax_runs_on_cpu(monkeypatch, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real(name, *a))
    with caplog.at_level(logging.WARNING, logger=cli.__name__):
        cli._check_accelerator("auto", "cpu")
    assert "FELL BACK TO CPU" in caplog.text and "libtpu" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=cli.__name__):
        cli._check_accelerator("auto", "tpu")
        cli._check_accelerator("tpu", "tpu")
    assert caplog.text == ""


@pytest.mark.parametrize("env,wanted", [
    ({}, False),
    ({"JAX_NUM_PROCESSES": "1"}, False),
    ({"JAX_NUM_PROCESSES": "4"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),          # single-host GKE TPU pod
    ({"TPU_WORKER_HOSTNAMES": "lws-0.lws,lws-0-1.lws"}, True),  # multi-host GKE TPU slice
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, True),
    ({"LWM_DISTRIBUTED": "1"}, True),
])
def test_multi_process_environments_are_recognised(env, wanted):
    from lwm_serve.model.mesh import distributed_requested

    assert distributed_requested(env) is wanted


def test_explicit_values_and_force_decide_whether_jax_distributed_starts(monkeypatch):
    import jax

    from lwm_serve.model import mesh

    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert mesh.maybe_initialize_distributed({}, force=False, coordinator_address="h:1") is False
    assert mesh.maybe_initialize_distributed({}, force=True) is True  # TPU VM slice: all from metadata
    assert mesh.maybe_initialize_distributed(
        {"JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"}, coordinator_address="h:1", num_processes=2,
        process_id=1) is True  # flags win over the environment
    assert calls == [{}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}]
