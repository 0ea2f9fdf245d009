"""The processes of a multi-host run other than process 0: no HTTP, only the model.

A follower loads the same weights onto its devices of the global mesh, then
replays process 0's slot-pool calls (server/engine/replica.py) until process 0
says stop, or is gone.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import jax

from lwm_serve.server.engine.replica import Follower, ReplicaLostError, live_processes

logger = logging.getLogger(__name__)

WATCH_S = 1.0


def follow(settings: Any) -> int:
    """Runs this process as a follower; the exit status (0 when process 0 stopped the run)."""
    from lwm_serve.server.app import load_runtime_for

    # Images and video are encoded by process 0 on its own devices: no VQGAN here.
    runtime = load_runtime_for(settings.model_copy(update={"vqgan": None}), progress=False)
    done = threading.Event()
    _watch_the_run(done)
    logger.info("process %d follows process 0", jax.process_index())
    try:
        Follower(runtime.generator).run()
    except ReplicaLostError as exc:
        logger.error("%s: this process stops", exc)
        return 1
    finally:
        done.set()
    # Leave the run now, while process 0 (which hosts the distributed runtime) waits for it.
    jax.distributed.shutdown()
    return 0


def _watch_the_run(done: threading.Event) -> None:
    """Ends this process when the run loses a process while we wait in a collective that
    might never return (a dead TPU host hangs rather than fails)."""
    live = live_processes()
    if live is None:
        return
    def watch() -> None:
        while not done.wait(WATCH_S):
            try:
                seen, expected = live()
            except Exception:  # the coordination service (on process 0) is gone
                seen, expected = 0, jax.process_count()
            if seen < expected and not done.is_set():
                logger.error("a process of the multi-host run is gone (%d of %d alive): exiting",
                             seen, expected)
                logging.shutdown()
                os._exit(1)

    threading.Thread(target=watch, name="lwm-follower-watchdog", daemon=True).start()
