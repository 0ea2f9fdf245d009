"""The restricted unpickler of pickled params trees (the VQGAN)."""

import os
import pickle
import subprocess

import numpy as np
import pytest

from lwm_serve.model import checkpoint as ck
from lwm_serve.model.unpickle import load_pickle_params, loads_pickle_params


def test_vqgan_pickle_loads_like_pickle(reference_dir):
    path = reference_dir / "vqgan" / "vqgan_params.pkl"
    ours = load_pickle_params(path)
    with open(path, "rb") as f:
        plain = pickle.load(f)
    a, b = dict(ck.flatten_params(ours)), dict(ck.flatten_params(plain))
    assert list(a) == list(b) and a
    for key in a:
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_array_pickles_every_protocol(protocol):
    tree = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]},
            "s": [np.float32(1.5), np.int64(3)]}
    back = loads_pickle_params(pickle.dumps(tree, protocol=protocol))
    np.testing.assert_array_equal(back["a"]["w"], tree["a"]["w"])
    assert back["s"] == tree["s"]


class _Hostile:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_hostile_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "os.system": _Hostile(os.system, f"touch {marker}"),
        "builtins.eval": _Hostile(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Hostile(subprocess.Popen, ["touch", str(marker)]),
        "builtins.exec": _Hostile(exec, f"open({str(marker)!r}, 'w').close()"),
    }
    for name, payload in cases.items():
        data = pickle.dumps({"params": {"w": np.ones(2, np.float32), "x": payload}})
        func = payload.func
        refused = f"{func.__module__}.{func.__qualname__}"
        path = tmp_path / "evil.pkl"
        path.write_bytes(data)
        with pytest.raises(ck.CheckpointError, match=f"refusing to unpickle global {refused}"):
            load_pickle_params(path)
        assert not marker.exists(), name
    # the payloads were live: plain pickle would have run them
    pickle.loads(pickle.dumps(cases["builtins.eval"]))
    assert marker.exists()


def test_corrupt_and_odd_pickles(tmp_path):
    data = pickle.dumps({"w": np.ones(3, np.float32)})
    with pytest.raises(ck.CheckpointError, match="corrupt or truncated"):
        loads_pickle_params(data[:-5])
    with pytest.raises(ck.CheckpointError, match="object array"):
        loads_pickle_params(pickle.dumps({"w": np.array([1, "a"], dtype=object)}))
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([np.ones(1)]))
    with pytest.raises(ck.CheckpointError, match="expected a dict"):
        load_pickle_params(tmp_path / "list.pkl")
    with pytest.raises(ck.CheckpointError, match="cannot read"):
        load_pickle_params(tmp_path / "missing.pkl")
