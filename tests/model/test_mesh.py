"""Mesh specs as the reference's --mesh_dim, on the 8 simulated CPU devices."""

from __future__ import annotations

import jax
import pytest

from lwm_serve.model import mesh as mesh_lib
from lwm_serve.model.mesh import MeshSpecError, make_mesh, parse_mesh_dim


@pytest.mark.parametrize("spec, count, dims", [
    ("1,1,4,64", 256, (1, 1, 4, 64)),
    ("1,1,-1,1", 8, (1, 1, 8, 1)),
    ("!1,1,-1,1", 8, (1, 1, 8, 1)),
    ("2, 1, 1, -1", 8, (2, 1, 1, 4)),
    ("sp:4,tp:2,dp:1,fsdp:1", 8, (1, 1, 2, 4)),
])
def test_parse_mesh_dim(spec, count, dims):
    got, plain = parse_mesh_dim(spec, count)
    assert got == dims
    assert plain == spec.startswith("!")


@pytest.mark.parametrize("spec, count, message", [
    ("1,1,4,64", 8, "multiplies to 256 devices, but 8"),
    ("1,-1,-1,1", 8, "at most one axis may be -1"),
    ("1,1,8", 8, "has 3 axes; expected 4"),
    ("1,1,a,8", 8, "not a list of integers"),
    ("1,3,-1,1", 8, "do not divide|does not divide"),
    ("1,0,8,1", 8, "positive"),
    ("dp:1,fsdp:1,tp:8", 8, "exactly the axes"),
])
def test_bad_specs_say_why(spec, count, message):
    with pytest.raises(MeshSpecError, match=message):
        parse_mesh_dim(spec, count)


def test_make_mesh_covers_all_devices():
    mesh = make_mesh("1,2,2,-1")
    assert mesh.axis_names == ("dp", "fsdp", "tp", "sp")
    assert dict(mesh.shape) == {"dp": 1, "fsdp": 2, "tp": 2, "sp": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_bang_prefix_keeps_device_order():
    mesh = make_mesh("!1,1,2,4")
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]


def test_mesh_over_a_subset_of_devices():
    mesh = make_mesh("1,1,1,-1", jax.devices()[:4])
    assert mesh.shape["sp"] == 4


def test_distributed_initialize_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert mesh_lib.maybe_initialize_distributed({}) is False
    assert calls == []
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    assert mesh_lib.maybe_initialize_distributed(env) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}]
