"""The device mesh: LWM's `mesh_dim` spec -> a `jax.sharding.Mesh` over every device.

A spec is four comma-separated sizes for the axes ('dp', 'fsdp', 'tp', 'sp'),
exactly as the reference's `--mesh_dim` (e.g. "1,1,4,64"); one size may be -1
and is inferred from the device count. Like the reference (tux `get_jax_mesh`):

* a leading `!` lays the devices out in plain `jax.devices()` order (the
  reference uses it to allow splitting a physical mesh axis); without it the
  devices are arranged by `mesh_utils.create_device_mesh`, which keeps each
  axis on physically close chips where the topology is known;
* the named form "dp:1,fsdp:2,tp:2,sp:2" (any order) is accepted too.

Multi-host: call `maybe_initialize_distributed()` before building the mesh; each
host runs the same program (JAX multi-controller) and the mesh spans the devices
of all hosts.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from lwm_serve.model.sharding import MESH_AXES

logger = logging.getLogger(__name__)


class MeshSpecError(ValueError):
    """A mesh spec that cannot be parsed or does not match the device count."""


def parse_mesh_dim(spec: str, device_count: int) -> tuple[tuple[int, ...], bool]:
    """Axis sizes in MESH_AXES order, and whether `!` (plain device order) was given.

    Args:
      spec: "1,1,4,64", "!1,1,-1,1" or "dp:1,fsdp:1,tp:4,sp:64".
      device_count: how many devices the mesh must cover.
    Raises:
      MeshSpecError: wrong number of axes, non-integers, two -1s, or sizes whose
        product is not the device count.
    """
    text = spec.strip()
    plain_order = text.startswith("!")
    if plain_order:
        text = text[1:]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if parts and all(":" in p for p in parts):
            named = {}
            for p in parts:
                name, size = p.split(":", 1)
                if name.strip() in named:
                    raise MeshSpecError(f"mesh spec {spec!r} names axis {name.strip()!r} twice")
                named[name.strip()] = int(size)
            if set(named) != set(MESH_AXES):
                raise MeshSpecError(
                    f"mesh spec {spec!r} must name exactly the axes {', '.join(MESH_AXES)}")
            dims = [named[a] for a in MESH_AXES]
        else:
            dims = [int(p) for p in parts]
    except ValueError as e:
        if isinstance(e, MeshSpecError):
            raise
        raise MeshSpecError(f"mesh spec {spec!r} is not a list of integers ({e})") from None
    if len(dims) != len(MESH_AXES):
        raise MeshSpecError(
            f"mesh spec {spec!r} has {len(dims)} axes; expected {len(MESH_AXES)} "
            f"({','.join(MESH_AXES)}), e.g. '1,1,4,64'")
    if dims.count(-1) > 1:
        raise MeshSpecError(f"mesh spec {spec!r}: at most one axis may be -1")
    if any(d == 0 or d < -1 for d in dims):
        raise MeshSpecError(f"mesh spec {spec!r}: sizes must be positive (or one -1)")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if device_count % known:
            raise MeshSpecError(
                f"mesh spec {spec!r}: the fixed axes multiply to {known}, which does not "
                f"divide the {device_count} devices")
        dims[dims.index(-1)] = device_count // known
    elif known != device_count:
        raise MeshSpecError(
            f"mesh spec {spec!r} multiplies to {known} devices, but {device_count} are "
            f"available; make the product {device_count} or use -1 for one axis")
    return tuple(dims), plain_order


def make_mesh(spec: str = "1,1,1,-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('dp','fsdp','tp','sp') mesh over `devices` (default: every device of every host)."""
    devices = list(jax.devices() if devices is None else devices)
    dims, plain_order = parse_mesh_dim(spec, len(devices))
    if plain_order or len(devices) == 1:
        grid = np.asarray(devices, dtype=object).reshape(dims)
    else:
        try:
            grid = mesh_utils.create_device_mesh(dims, devices=devices)
        except (AssertionError, ValueError, NotImplementedError) as e:
            # Unknown topologies (CPU, some GPU hosts): fall back to device order.
            logger.debug("create_device_mesh failed (%s); using device order", e)
            grid = np.asarray(devices, dtype=object).reshape(dims)
    mesh = Mesh(grid, MESH_AXES)
    logger.info("mesh %s over %d %s devices", dict(mesh.shape), len(devices), devices[0].platform)
    return mesh


def distributed_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment describes a run of several processes (pure; reads `env` only).

    Recognised: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` > 1 (JAX's own variables),
    `TPU_WORKER_HOSTNAMES` naming more than one host (a multi-host TPU slice on GKE),
    `SLURM_NTASKS` > 1 inside a SLURM job, and `LWM_DISTRIBUTED=1` (a TPU VM pod slice,
    whose topology JAX reads from the TPU metadata server rather than the environment).
    """
    env = os.environ if env is None else env

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1") or 1)
        except ValueError:
            return 1

    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return (env.get("LWM_DISTRIBUTED", "").lower() in ("1", "true", "yes")
            or bool(env.get("JAX_COORDINATOR_ADDRESS"))
            or count("JAX_NUM_PROCESSES") > 1
            or len(hosts) > 1
            or (bool(env.get("SLURM_JOB_ID")) and count("SLURM_NTASKS") > 1))


def maybe_initialize_distributed(env: Mapping[str, str] | None = None, *,
                                 coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None,
                                 force: bool | None = None,
                                 heartbeat_timeout_s: int | None = None) -> bool:
    """Start JAX's multi-controller runtime when asked to, before any mesh is built.

    Explicit arguments (the CLI's `--coordinator/--num-processes/--process-id`) win;
    without them `jax.distributed.initialize()` reads the coordinator address, process
    count and id from the cluster environment (TPU pods, GKE, SLURM, or JAX's
    `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`).

    Args:
      env: the environment to inspect (default: os.environ).
      coordinator_address, num_processes, process_id: explicit values.
      force: True initialises even when nothing asks for it (a TPU VM pod slice is
        only visible through its metadata server); False never initialises; None
        (default) initialises when an explicit value is given or
        `distributed_requested(env)`.
      heartbeat_timeout_s: a process silent this long counts as dead (JAX's default: 100 s).
    Returns:
      True when this call initialised the runtime; False when it was not asked for
      or was already running (safe to call twice).
    """
    env = os.environ if env is None else env
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    wanted = force if force is not None else (explicit or distributed_requested(env))
    if not wanted or jax.distributed.is_initialized():
        return False
    kwargs: dict[str, object] = {}
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
    if address:
        kwargs["coordinator_address"] = address
    if count not in (None, ""):
        kwargs["num_processes"] = int(count)
    if index not in (None, ""):
        kwargs["process_id"] = int(index)
    if heartbeat_timeout_s is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_s
    # Recoverable: when a process dies the others keep running (JAX's default ends them
    # all), so process 0 can still answer "not ready" / 503 instead of vanishing.
    jax.config.update("jax_enable_recoverability", True)
    logger.info("initialising jax.distributed (%s)",
                ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "from the cluster environment")
    jax.distributed.initialize(**kwargs)
    logger.info("jax.distributed initialised: process %d of %d, %d global devices",
                jax.process_index(), jax.process_count(), jax.device_count())
    return True
