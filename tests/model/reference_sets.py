"""Reference sets for the model tests: the public one, and one generated at test time.

A reference set is a directory in the layout of tests/fixtures/lwm_reference
(README there): `model/config.json`, `model/manifest.json` (each params file's
layout, dtype, bytes and records), the params files, an optional chunked-record
demo with its json, and `cases/<name>/{case.json,data.npz}`. `ReferenceSet`
answers every question a test asks about a set from those files alone, so the
same tests run on any set.

`generate_reference_set` writes a second set whose every size differs from the
public one (hidden, layers, heads, MLP, text and vision vocabularies, theta,
eps, a per-layer primary file, layer axis second in the scanned file, norm
weights that are not ones, records in shuffled order). Its params files are
written with the project's writer (tests check them against
`flax.serialization`); its expected outputs come from `numpy_forward`, a plain
numpy (float64) restatement of the README's §4 semantics that shares no code
with lwm_serve, so a test passes on it only if the model really computes that.

Loaded by tests/model/conftest.py (test modules cannot import each other).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

GENERATED_CONFIG: dict[str, Any] = {
    "hidden_size": 48, "intermediate_size": 100, "num_hidden_layers": 3,
    "num_attention_heads": 6, "max_sequence_length": 2048, "theta": 12345.0,
    "rms_norm_eps": 1e-5, "initializer_range": 0.05, "vision_vocab_size": 8256,
    "vocab_size": 300, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "tie_vision_embeddings": False,
    "scan_attention": False, "scan_query_chunk_size": 64, "scan_key_chunk_size": 64,
    "scan_mlp": False, "scan_mlp_chunk_size": 8192, "param_scan_axis": 1,
    "scan_layers": False,
}
_SCAN_KEY = "scan_decoder"
_LAYER_PARAMS = {  # path under a layer -> (rows, cols) in units of (hidden, mlp)
    ("attention", "wq", "kernel"): ("h", "h"), ("attention", "wk", "kernel"): ("h", "h"),
    ("attention", "wv", "kernel"): ("h", "h"), ("attention", "wo", "kernel"): ("h", "h"),
    ("feed_forward", "w1", "kernel"): ("h", "m"), ("feed_forward", "w2", "kernel"): ("m", "h"),
    ("feed_forward", "w3", "kernel"): ("h", "m"),
    ("attention_norm", "kernel"): ("h",), ("ffn_norm", "kernel"): ("h",),
}
_CHUNK_DEMO_BYTES = 12000


# ----------------------------------------------------------------------------- reading a set


class ReferenceSet:
    """One reference set on disk; every fact is read from its own files."""

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, Path(root)
        self.model_dir = self.root / "model"
        self.raw_config = json.loads((self.model_dir / "config.json").read_text())
        self.manifest = json.loads((self.model_dir / "manifest.json").read_text())
        self.files: dict[str, dict] = self.manifest["files"]
        demo = self.model_dir / "params_chunked_demo.json"
        self.demo: dict | None = json.loads(demo.read_text()) if demo.exists() else None
        self.demo_file = "params_chunked_demo" if self.demo else None

    def __repr__(self) -> str:
        return f"ReferenceSet({self.name})"

    def config(self, scan_layers: bool | None = None):
        from lwm_serve.model.config import from_reference_json

        over = {} if scan_layers is None else {"scan_layers": scan_layers}
        return from_reference_json(self.model_dir / "config.json", **over)

    def file_config(self, file: str):
        """The config with the layer layout the file's manifest entry declares."""
        return self.config(self.files[file]["scan_layers"])

    def fp32_file(self, scan_layers: bool) -> str | None:
        return next((n for n, f in self.files.items()
                     if f["float_dtype"] == "fp32" and f["scan_layers"] == scan_layers), None)

    @property
    def primary(self) -> str:
        """The fp32 file in the set's primary layout."""
        name = self.fp32_file(self.manifest["primary_scan_layers"])
        assert name, f"{self.name}: manifest lists no fp32 file in the primary layout"
        return name

    @property
    def bf16_file(self) -> str:
        name = next((n for n, f in self.files.items() if f["float_dtype"] == "bf16"), None)
        assert name, f"{self.name}: manifest lists no bf16 file"
        return name

    def path(self, file: str) -> Path:
        return self.model_dir / file

    @functools.cache
    def arrays(self, file: str) -> dict[tuple[str, ...], np.ndarray]:
        """The file's records (key path -> numpy array), in file order."""
        from lwm_serve.model.checkpoint import iter_params_file

        return dict(iter_params_file(self.path(file)))

    @functools.cache
    def params(self, file: str | None = None, dtype: str = "float32"):
        """A params file loaded as the model uses it (default: the primary file)."""
        from lwm_serve.model.checkpoint import load_params

        return load_params(self.path(file or self.primary), dtype=dtype, progress=False)

    # ------------------------------------------------------------------------- cases

    def case_dirs(self) -> list[Path]:
        """Every case with a case.json; each must have its data.npz (a missing one
        fails here rather than silently dropping the case)."""
        dirs = sorted(p.parent for p in (self.root / "cases").glob("*/case.json"))
        missing = [d.name for d in dirs if not (d / "data.npz").is_file()]
        if missing:
            raise FileNotFoundError(f"{self.name} reference set: cases without data.npz: {missing}")
        return dirs

    @staticmethod
    def load_case(case_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
        return (json.loads((case_dir / "case.json").read_text()),
                dict(np.load(case_dir / "data.npz")))

    def case_checkpoint(self, case: dict) -> str:
        """Which params file a case was computed from (default: the primary file)."""
        if "checkpoint" in case:
            return Path(case["checkpoint"]).name
        return case.get("computed_with", self.primary)

    def forward_runs(self) -> list[tuple[Path, str]]:
        """(case dir, params file) of every forward case; a case computed from an fp32
        file also runs from the fp32 file of the other layout (same weights)."""
        runs = []
        for d in self.case_dirs():
            case, arrays = self.load_case(d)
            if not is_forward_case(arrays):
                continue
            file = self.case_checkpoint(case)
            runs.append((d, file))
            entry = self.files[file]
            other = self.fp32_file(not entry["scan_layers"])
            if entry["float_dtype"] == "fp32" and other:
                runs.append((d, other))
        return runs

    def generation_cases(self) -> list[Path]:
        return [d for d in self.case_dirs() if is_generation_case(*self.load_case(d))]


def is_forward_case(arrays: dict) -> bool:
    return "position_ids" in arrays and any(k.startswith("text_logits") for k in arrays)


def is_generation_case(case: dict, arrays: dict) -> bool:
    return "output_ids" in arrays or "image_tokens_257" in case


# ----------------------------------------------------------------------------- the oracle


def _rope_tables(max_len: int, d: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    # README §4: computed with numpy in float32.
    inv = (1.0 / theta ** (np.arange(0, d, 2)[: d // 2].astype(np.float32) / d)).astype(np.float32)
    angles = np.outer(np.arange(max_len), inv).astype(np.float32)
    return np.cos(angles).astype(np.float64), np.sin(angles).astype(np.float64)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [B, T, N, D]; channels (2i, 2i+1) rotate as a complex number. cos/sin [B, T, D/2]."""
    re, im = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, :, None], sin[:, :, None]
    return np.stack([re * c - im * s, re * s + im * c], axis=-1).reshape(x.shape)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def numpy_forward(tree: dict, raw_cfg: dict, ids: np.ndarray, vision_mask: np.ndarray,
                  positions: np.ndarray, attention_mask: np.ndarray,
                  segment_ids: np.ndarray | None = None) -> dict[str, Any]:
    """The reference forward (README §4) in float64 numpy over a PER-LAYER tree.

    Returns text and vision logits [B, T, V] and hidden states (each layer's input,
    then the ln_f output).
    """
    h_size, n = raw_cfg["hidden_size"], raw_cfg["num_attention_heads"]
    d, eps = h_size // n, raw_cfg["rms_norm_eps"]
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    tr = tree["transformer"]
    m = vision_mask.astype(np.float64)[..., None]
    x = (f(tr["wte"]["embedding"])[np.where(vision_mask, 0, ids)] * (1 - m)
         + f(tr["vte"]["embedding"])[np.where(vision_mask, ids, 0)] * m)
    b, t = ids.shape
    cos_t, sin_t = _rope_tables(raw_cfg["max_sequence_length"], d, raw_cfg["theta"])
    cos, sin = cos_t[positions], sin_t[positions]  # negative positions wrap, as jnp.take does
    idx = np.arange(t)
    mask = (idx[None, :, None] >= idx[None, None, :]) & (attention_mask[:, None, :] > 0)
    if segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
    hidden = []
    for i in range(raw_cfg["num_hidden_layers"]):
        lp = tr["h"][str(i)]
        hidden.append(x)
        a = lp["attention"]
        hn = _rms(x, f(lp["attention_norm"]["kernel"]), eps)
        q = _rope((hn @ f(a["wq"]["kernel"])).reshape(b, t, n, d), cos, sin)
        k = _rope((hn @ f(a["wk"]["kernel"])).reshape(b, t, n, d), cos, sin)
        v = (hn @ f(a["wv"]["kernel"])).reshape(b, t, n, d)
        scores = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(d)
        scores = np.where(mask[:, None], scores, np.finfo(np.float32).min)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out = np.einsum("bnts,bsnd->btnd", p, v).reshape(b, t, h_size)
        x = x + out @ f(a["wo"]["kernel"])
        ff = lp["feed_forward"]
        hn = _rms(x, f(lp["ffn_norm"]["kernel"]), eps)
        gate = hn @ f(ff["w1"]["kernel"])
        x = x + (gate / (1 + np.exp(-gate)) * (hn @ f(ff["w3"]["kernel"]))) @ f(ff["w2"]["kernel"])
    x = _rms(x, f(tr["ln_f"]["kernel"]), eps)
    hidden.append(x)
    return {"text_logits": x @ f(tree["lm_head"]["kernel"]),
            "vision_logits": x @ f(tree["vision_head"]["kernel"]), "hidden_states": hidden}


# ----------------------------------------------------------------------------- the generated set


def _unflatten(items: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in items.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _flatten(tree: dict, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _per_layer_weights(cfg: dict, rng: np.random.Generator) -> dict[tuple[str, ...], np.ndarray]:
    h, m, std = cfg["hidden_size"], cfg["intermediate_size"], cfg["initializer_range"]
    dims = {"h": h, "m": m}
    normal = lambda *shape: (std * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    # Norm scales away from 1, so that a model ignoring them cannot match.
    scale = lambda n: (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    items = {
        ("lm_head", "kernel"): normal(h, cfg["vocab_size"]),
        ("vision_head", "kernel"): normal(h, cfg["vision_vocab_size"]),
        ("transformer", "wte", "embedding"): normal(cfg["vocab_size"], h),
        ("transformer", "vte", "embedding"): normal(cfg["vision_vocab_size"], h),
        ("transformer", "ln_f", "kernel"): scale(h),
    }
    for i in range(cfg["num_hidden_layers"]):
        for path, shape in _LAYER_PARAMS.items():
            sizes = [dims[s] for s in shape]
            items[("transformer", "h", str(i), *path)] = (
                scale(*sizes) if len(sizes) == 1 else normal(*sizes))
    return items


def _stack(items: dict, cfg: dict) -> dict[tuple[str, ...], np.ndarray]:
    out = {k: v for k, v in items.items() if k[:2] != ("transformer", "h")}
    for path in _LAYER_PARAMS:
        layers = [items[("transformer", "h", str(i), *path)] for i in range(cfg["num_hidden_layers"])]
        out[("transformer", "h", _SCAN_KEY, *path)] = np.stack(layers, axis=cfg["param_scan_axis"])
    return out


def _manifest_entry(path: Path, items: dict, scan: bool, float_dtype: str) -> dict:
    return {"scan_layers": scan, "float_dtype": float_dtype, "n_arrays": len(items),
            "bytes": path.stat().st_size,
            "arrays": [{"key": "/".join(k), "shape": list(v.shape), "dtype": v.dtype.name}
                       for k, v in items.items()]}


def _write_case(root: Path, name: str, case: dict, arrays: dict[str, np.ndarray]) -> None:
    d = root / "cases" / name
    d.mkdir(parents=True)
    (d / "case.json").write_text(json.dumps(case, indent=1))
    np.savez_compressed(d / "data.npz", **arrays)


def _as_f32(out: dict) -> dict:
    return {"text_logits": out["text_logits"].astype(np.float32),
            "vision_logits": out["vision_logits"].astype(np.float32),
            "hidden_states": np.stack(out["hidden_states"]).astype(np.float32)}


def _greedy(tree: dict, cfg: dict, prompt: list[int], steps: int) -> list[int]:
    """Greedy text generation by full recomputation; refuses near ties, which fp32
    rounding could flip."""
    ids, out = list(prompt), []
    for _ in range(steps):
        arr = np.asarray([ids])
        logits = numpy_forward(tree, cfg, arr, np.zeros_like(arr, bool),
                               np.arange(len(ids))[None], np.ones_like(arr))["text_logits"][0, -1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-4, "near tie in the generated greedy case: change the seed"
        token = int(np.argmax(logits))
        out.append(token)
        if token == cfg["eos_token_id"]:
            break
        ids.append(token)
    return out + [0] * (steps - len(out))  # finished rows emit pad


def generate_reference_set(root: Path, seed: int = 20251130) -> Path:
    """Write the second reference set under `root` (see the module docstring)."""
    from lwm_serve.model.params_writer import save_params

    cfg = GENERATED_CONFIG
    rng = np.random.default_rng(seed)
    model = root / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(cfg, indent=1))
    per_layer = _per_layer_weights(cfg, rng)
    order = list(per_layer)
    rng.shuffle(order)  # readers must not depend on record order (README §3 item 5)
    per_layer = {k: per_layer[k] for k in order}
    scanned = _stack(per_layer, cfg)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in per_layer.items()}
    files = {"params_noscan": (per_layer, False, "fp32"), "params_scan": (scanned, True, "fp32"),
             "params_bf16": (bf16, cfg["scan_layers"], "bf16")}
    manifest: dict[str, Any] = {"primary_scan_layers": cfg["scan_layers"],
                                "param_scan_axis": cfg["param_scan_axis"], "files": {}}
    for name, (items, scan, float_dtype) in files.items():
        tree = _unflatten(items)
        save_params(model / name, tree)
        manifest["files"][name] = _manifest_entry(model / name, dict(_flatten(tree)), scan,
                                                  float_dtype)
    (model / "manifest.json").write_text(json.dumps(manifest, indent=1))

    # The chunked-record demo: three arrays of the primary file, one cast to bf16.
    picks = [("transformer", "wte", "embedding"), ("transformer", "ln_f", "kernel"),
             ("transformer", "h", "1", "feed_forward", "w2", "kernel")]
    demo_items = {picks[0]: per_layer[picks[0]], picks[1]: per_layer[picks[1]],
                  picks[2]: per_layer[picks[2]].astype(ml_dtypes.bfloat16)}
    save_params(model / "params_chunked_demo", _unflatten(demo_items),
                chunk_threshold=_CHUNK_DEMO_BYTES)
    records = []
    for key, value in demo_items.items():
        chunked = value.nbytes > _CHUNK_DEMO_BYTES
        per_chunk = _CHUNK_DEMO_BYTES // value.dtype.itemsize
        records.append({
            "key": "/".join(key), "shape": list(value.shape), "dtype": value.dtype.name,
            "nbytes": value.nbytes, "chunked": chunked,
            "elements_per_chunk": per_chunk if chunked else None,
            "n_chunks": -(-value.size // per_chunk) if chunked else 0,
            "source": "model/params_noscan (same key)"
                      + (", cast to bfloat16" if value.dtype != np.float32 else "")})
    (model / "params_chunked_demo.json").write_text(json.dumps(
        {"purpose": "chunked-array records (generated set)",
         "max_chunk_size_bytes_used": _CHUNK_DEMO_BYTES, "records_in_file_order": records},
        indent=1))

    tree = _unflatten(per_layer)
    bf16_tree = _unflatten({k: v.astype(np.float32) for k, v in bf16.items()})
    vocab = cfg["vocab_size"]

    # forward_text: two rows, the second left padded.
    t, pad = 15, 4
    ids = rng.integers(3, vocab, size=(2, t)).astype(np.int32)
    ids[:, 0] = cfg["bos_token_id"]
    ids[1, :pad] = 0
    ids[1, pad] = cfg["bos_token_id"]
    attn = np.ones((2, t), np.int32)
    attn[1, :pad] = 0
    pos = (np.cumsum(attn, -1) - 1).astype(np.int32)
    base = {"input_ids": ids, "vision_masks": np.zeros((2, t), bool), "attention_mask": attn,
            "segment_ids": np.zeros((2, t), np.int32), "position_ids": pos}
    out = numpy_forward(tree, cfg, ids, base["vision_masks"], pos, attn, base["segment_ids"])
    _write_case(root, "forward_text", {"computed_with": "params_noscan", "sample_mode": "all"},
                {**base, **_as_f32(out)})
    out = numpy_forward(bf16_tree, cfg, ids, base["vision_masks"], pos, attn, base["segment_ids"])
    _write_case(root, "forward_text_bf16_checkpoint", {"checkpoint": "model/params_bf16"},
                {**base, "text_logits": out["text_logits"].astype(np.float32),
                 "vision_logits_last": out["vision_logits"][:, -1].astype(np.float32)})

    # forward_mixed: text, two frames of codes (8192 after the first, 8193 after the
    # last), text, left padded to a multiple of the block size.
    frames = rng.integers(0, 8192, size=(2, 256))
    vision = [*frames[0], 8192, *frames[1], 8193]
    head = [1, *rng.integers(3, vocab, size=9)]
    tail = [1, *rng.integers(3, vocab, size=4)]
    row = head + vision + tail
    length = -(-len(row) // 128) * 128
    ids = np.zeros((1, length), np.int32)
    ids[0, length - len(row):] = row
    vmask = np.zeros((1, length), bool)
    vmask[0, length - len(row) + len(head): length - len(tail)] = True
    attn = np.zeros((1, length), np.int32)
    attn[0, length - len(row):] = 1
    pos = (np.cumsum(attn, -1) - 1).astype(np.int32)
    seg = np.zeros((1, length), np.int32)
    out = _as_f32(numpy_forward(tree, cfg, ids, vmask, pos, attn, seg))
    valid = np.nonzero(attn[0])[0].astype(np.int32)
    vis_pos = np.unique(np.concatenate([valid[:len(head) + 1], valid[len(head)::64],
                                        valid[len(head) + 255: len(head) + 258], valid[-3:]]))
    _write_case(root, "forward_mixed", {"computed_with": "params_noscan", "sample_mode": "all",
                                        "frame_codes": frames.tolist()},
                {"input_ids": ids, "vision_masks": vmask, "attention_mask": attn,
                 "segment_ids": seg, "position_ids": pos, "valid_positions": valid,
                 "text_logits_valid": out["text_logits"][0, valid],
                 "vision_logits_positions": vis_pos.astype(np.int32),
                 "vision_logits_at_positions": out["vision_logits"][0, vis_pos],
                 "final_hidden_valid": out["hidden_states"][-1, 0, valid],
                 "hidden_states_valid": out["hidden_states"][:, 0, valid]})

    # generate_text_greedy: the forward_text rows, 8 greedy tokens each.
    text = dict(np.load(root / "cases" / "forward_text" / "data.npz"))
    steps = 8
    outputs = [_greedy(tree, cfg, r[a.astype(bool)].tolist(), steps)
               for r, a in zip(text["input_ids"], text["attention_mask"])]
    _write_case(root, "generate_text_greedy",
                {"checkpoint": "model/params_noscan", "sample_mode": "text",
                 "generation_config": {"max_new_tokens": steps, "pad_token_id": 0,
                                       "eos_token_id": cfg["eos_token_id"], "do_sample": False}},
                {"input_ids": text["input_ids"], "vision_masks": text["vision_masks"],
                 "attention_mask": text["attention_mask"],
                 "output_ids": np.asarray(outputs, np.int32)})
    return root
