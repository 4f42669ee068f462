"""Adapters on the DiT and the seconds conditioners, all eight types of
stable-audio-tools 0.0.20, read and written in its file format
(stable_audio_tools/models/lora/; docs/reference.md, "Adapters").

An adapter turns a layer's weight W (out, in) into V = W + s D, s = alpha / rank *
strength, D = B A (or U M V^T for the -xs types, U and V the top singular vectors of the
original W), then
    lora:       V
    dora-rows:  m * V / ||V||, the norm taken over each row (eps 1e-12)
    dora-cols:  the same over each column
    bora:       rows, then the result's columns, each to its own magnitudes
Adapters stack in the order they are applied, each on the weight the ones before it
made. One that is always on is merged into a floating-point weight once; the others
(over a quantized weight, or active only within a noise interval) wrap their layer in a
LoRALinear."""

import json
import math
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .bases import cached_bases
from .model_io import FLOATS, RENAMES, read_safetensors, write_safetensors

TENSORS = {  # each type's tensors in a file (the -xs types' bases U, V are not saved)
    "lora": ("lora_A", "lora_B"),
    "dora-rows": ("lora_A", "lora_B", "magnitude"),
    "dora-cols": ("lora_A", "lora_B", "magnitude"),
    "bora": ("lora_A", "lora_B", "magnitude_r", "magnitude_c"),
    "lora-xs": ("M_xs",),
    "dora-rows-xs": ("M_xs", "magnitude"),
    "dora-cols-xs": ("M_xs", "magnitude"),
    "bora-xs": ("M_xs", "magnitude_r", "magnitude_c"),
}
ADAPTER_TYPES = tuple(TENSORS)
KEY = (  # between a layer's name and its tensor's, in the files
    ".parametrizations.weight.0."
)
EPS = 1e-12
BLOCK_LAYERS = (
    "self_attn.to_qkv",
    "self_attn.to_out",
    "cross_attn.to_q",
    "cross_attn.to_kv",
    "cross_attn.to_out",
    "ff.ff.0.proj",
    "ff.ff.2",
)


def official_layers(depth: int, numbers) -> dict:
    """{name: (component, our module path)} of every layer an adapter may change: each
    Linear and Conv1d of stable-audio-tools' DiT (named as in adapter files and
    include/exclude: relative to its DiTWrapper) and of its conditioner (the seconds
    embedders; T5 gets none), for a DiT of `depth` blocks and the number conditioners
    `numbers`. Our paths come from the checkpoint rename table."""
    dit = [
        f"{e}.{i}"
        for e in ("to_timestep_embed", "to_cond_embed", "to_global_embed")
        for i in (0, 2)
    ]
    dit += [
        "preprocess_conv",
        "postprocess_conv",
        "transformer.project_in",
        "transformer.project_out",
    ]
    dit += [f"transformer.layers.{i}.{p}" for i in range(depth) for p in BLOCK_LAYERS]
    keys = {f"model.{n}": f"model.model.{n}.weight" for n in dit}
    for number in numbers:
        name = f"conditioners.{number}.embedder.embedding.1"
        keys[name] = f"conditioner.{name}.weight"
    layers = {}
    for name, key in keys.items():
        for old, new in RENAMES:
            key = key.replace(old, new)
        component, path = key[: -len(".weight")].split(".", 1)
        layers[name] = (component, path)
    return layers


def expand(pattern: str) -> list:
    """0.0.20's bracket expansion: "layers.[0-2]." stands for layers.0., layers.1.,
    layers.2."""
    parts = re.split(r"\[(\d+)-(\d+)\]", pattern)
    pools = []
    for a, b in zip(map(int, parts[1::3]), map(int, parts[2::3])):
        step = 1 if b >= a else -1
        pools.append([str(n) for n in range(a, b + step, step)])
    return [
        "".join(p + n for p, n in zip(parts[0::3], combo + ("",)))
        for combo in product(*pools)
    ]


def matches(name: str, patterns) -> bool:
    """Whether `name` contains any of `patterns` (substrings, brackets expanded)."""
    return any(e in name for p in patterns for e in expand(p.strip()))


def picked(name: str, include=None, exclude=None) -> bool:
    """Whether include/exclude (None: no such list) pick a layer, exclude winning."""
    return (include is None or matches(name, include)) and not (
        exclude is not None and matches(name, exclude)
    )


def filter_patterns(layer_filter: str) -> list:
    """A layer filter as 0.0.20 reads it: comma-separated, lower-cased patterns."""
    return [p.strip().lower() for p in (layer_filter or "").split(",") if p.strip()]


def parse_file_strength(text: str) -> tuple:
    """The scripts' FILE[:STRENGTH]: what follows the last colon is the strength if it
    reads as a number (default 1)."""
    path, sep, strength = text.rpartition(":")
    if sep:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def check_lora(
    path, strength: float = 1.0, interval: tuple = None, layer_filter: str = ""
):
    """Refuse, with a one-line ValueError, an adapter file that is not there or a
    setting that cannot apply (the file itself is checked when read, against the
    model)."""
    if not Path(path).is_file():
        raise ValueError(
            f"The adapter file {path} does not exist."
            if not Path(path).exists()
            else f"The adapter {path} is not a file."
        )
    if not (type(strength) in (int, float) and math.isfinite(strength)):
        raise ValueError(
            f"The LoRA strength must be a finite number, not {strength!r}."
        )
    if interval is not None and not (
        len(interval) == 2
        and all(math.isfinite(v) for v in interval)
        and 0 <= interval[0] <= interval[1] <= 1
    ):
        raise ValueError(
            "The LoRA interval must satisfy 0 <= MIN <= MAX <= 1 (noise levels: sin(pi"
            " t / 2) for v models, t for flow)."
        )
    if not isinstance(layer_filter, str):
        raise ValueError(
            "The LoRA layer filter must be a string of comma-separated patterns."
        )


@dataclass
class AdapterFile:
    path: Path
    adapter_type: str
    rank: int
    alpha: float
    lora_config: dict  # the file's metadata, as written
    layers: dict  # official layer name -> {tensor name: float32 array}

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def described(self, strength: float, interval: tuple, layer_filter: str) -> dict:
        """What an interface shows of the adapter as applied."""
        return {
            "file": self.path.name,
            "adapter_type": self.adapter_type,
            "rank": self.rank,
            "alpha": self.alpha,
            "strength": strength,
            "interval": interval,
            "layer_filter": layer_filter,
        }


def _dense_shape(layer) -> tuple:
    """(out, in) of a layer's weight viewed as a matrix (a 1x1 conv's too)."""
    if isinstance(layer, LoRALinear):
        return _dense_shape(layer.base)
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[0], layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.shape[0], math.prod(layer.weight.shape[1:])


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else root[part]
    return root


def _positive_number(value) -> bool:
    return type(value) in (int, float) and 0 < value < math.inf


def read_adapter(path, dit, conditioner) -> AdapterFile:
    """An adapter file of stable-audio-tools 0.0.20 (or ours), checked strictly against
    the model: every tensor must belong to a layer of it that the file's include/exclude
    claim, with the shape its rank implies, and every claimed layer must have all of its
    tensors. Each refusal is one line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The adapter file {path} does not exist.")
    if path.suffix == ".ckpt":
        raise ValueError(
            f"{path} is a pickled checkpoint, which is not read (unpickling can run"
            " code): convert it to .safetensors with stable-audio-tools'"
            " convert_lora_ckpt_to_safetensors."
        )
    tensors, metadata = read_safetensors(path, FLOATS, metadata=True)
    settings = _lora_config(path, metadata)
    kind, rank, alpha = _kind_rank_alpha(path, settings, tensors)
    include, exclude = _patterns(path, settings)
    layers = official_layers(len(dit.layers), conditioner.numbers)
    claimed = [name for name in layers if picked(name, include, exclude)]
    modules = {"dit": dit, "conditioner": conditioner}
    found = {}
    for key, value in tensors.items():
        layer, name, value = _checked(
            path, key, value, kind, rank, layers, claimed, modules
        )
        found.setdefault(layer, {})[name] = value
    if not found:
        raise ValueError(f"{path} holds no adapter tensors.")
    for layer in claimed:
        missing = [n for n in TENSORS[kind] if n not in found.get(layer, {})]
        if missing:
            raise ValueError(
                f"{path} has no tensor {layer}{KEY}{missing[0]}, for a layer that its"
                " lora_config claims."
            )
    if kind.endswith("-xs"):
        _add_bases(path, found, rank, layers, modules)
    return AdapterFile(
        path, kind, rank, alpha, settings, {name: found[name] for name in claimed}
    )


def _add_bases(path, found: dict, rank: int, layers: dict, modules: dict):
    """The -xs bases U, V of each layer, from its original weight (as 0.0.20 takes
    them, whatever adapters came before): refused where an adapter merged before has
    changed that weight."""
    for layer, tensors in found.items():
        component, module = layers[layer]
        if layer in getattr(modules[component], "merged_adapters", ()):
            raise ValueError(
                f"{path}: its bases are the singular vectors of {layer}'s original"
                " weight, which an adapter applied before it has changed: apply this"
                " one first."
            )
        weight = _dense_weight(_chain(_module(modules[component], module))[1])
        tensors["U"], tensors["V"] = cached_bases(weight, rank)


def _lora_config(path: Path, metadata: dict) -> dict:
    """The file's lora_config metadata (rank, alpha, adapter_type, include, exclude)."""
    try:
        settings = json.loads((metadata or {}).get("lora_config", "{}"))
    except ValueError:
        raise ValueError(
            f"{path}: its lora_config metadata is not valid JSON."
        ) from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: its lora_config metadata is not a JSON object.")
    return settings


def _patterns(path: Path, settings: dict) -> tuple:
    """The file's include and exclude lists (None: not given)."""
    for what in ("include", "exclude"):
        patterns = settings.get(what)
        if patterns is not None and not (
            isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)
        ):
            raise ValueError(
                f"{path}: its lora_config {what} is not a list of strings."
            )
    return settings.get("include"), settings.get("exclude")


def _kind_rank_alpha(path: Path, settings: dict, tensors: dict) -> tuple:
    """The adapter type, rank and alpha, as 0.0.20 infers what the file leaves out."""
    kind = settings.get("adapter_type", "lora")
    if kind == "dora":  # 0.0.20's legacy name: the magnitudes' shape tells which
        magnitudes = [v for k, v in tensors.items() if k.endswith(".magnitude")]
        kind = (
            "dora-cols"
            if magnitudes and magnitudes[0].ndim == 2 and magnitudes[0].shape[0] == 1
            else "dora-rows"
        )
    if kind not in ADAPTER_TYPES:
        raise ValueError(
            f"{path}: unknown adapter_type {kind!r} in its lora_config (supported:"
            f" {', '.join(ADAPTER_TYPES)})."
        )
    ranks = [v.shape[0] for k, v in tensors.items() if k.endswith((".lora_A", ".M_xs"))]
    rank = settings.get("rank", ranks[0] if ranks else None)  # as 0.0.20 infers it
    alpha = settings.get("alpha", rank)
    if type(rank) is not int or rank <= 0:
        raise ValueError(
            f"{path} holds no adapter tensors."
            if rank is None
            else f"{path}: its lora_config rank {rank!r} is not a positive integer."
        )
    if not _positive_number(alpha):
        raise ValueError(
            f"{path}: its lora_config alpha {alpha!r} is not a positive number."
        )
    return kind, rank, alpha


def _checked(path, key, value, kind, rank, layers, claimed, modules) -> tuple:
    """(layer, tensor name, float32 value) of a tensor of the file, refused unless it
    belongs to a claimed layer of this model, with the shape the rank implies."""
    layer, sep, name = key.rpartition(KEY)
    if not sep or layer not in layers:
        raise ValueError(
            f"{path}: unexpected tensor {key} (this model has no such layer: is the"
            " file for another model?)."
        )
    if name not in TENSORS[kind]:
        raise ValueError(
            f"{path}: unexpected tensor {key} (a {kind} adapter has"
            f" {', '.join(TENSORS[kind])})."
        )
    if layer not in claimed:
        raise ValueError(
            f"{path}: tensor {key} is for a layer that its lora_config's"
            " include/exclude leave out."
        )
    component, module = layers[layer]
    out_dim, in_dim = _dense_shape(_module(modules[component], module))
    if kind.endswith("-xs") and rank > min(out_dim, in_dim):
        raise ValueError(
            f"{path}: tensor {key} is of rank {rank}, beyond the smaller side of its"
            f" {out_dim} x {in_dim} layer (an -xs adapter's bases are its singular"
            " vectors)."
        )
    expected = {
        "lora_A": (rank, in_dim),
        "lora_B": (out_dim, rank),
        "magnitude": (in_dim,) if kind.startswith("dora-cols") else (out_dim,),
        "magnitude_r": (out_dim,),
        "magnitude_c": (in_dim,),
        "M_xs": (rank, rank),
    }[name]
    if name.startswith("magnitude") and value.ndim == 2 and 1 in value.shape:
        value = value.reshape(-1)  # 0.0.20 squeezes them
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{path}: tensor {key} has shape {tuple(value.shape)}; this model, at the"
            f" file's rank {rank}, expects {expected} (is the file for another model?)."
        )
    value = value.astype(mx.float32)
    if not mx.all(mx.isfinite(value)).item():
        raise ValueError(f"{path}: tensor {key} holds NaN or Inf: the file is damaged.")
    return layer, name, value


def layer_shapes(dit, conditioner, include=None, exclude=None) -> dict:
    """{official layer name: (out, in)} of the layers `include`/`exclude` pick."""
    modules = {"dit": dit, "conditioner": conditioner}
    layers = official_layers(len(dit.layers), conditioner.numbers)
    return {
        name: _dense_shape(_module(modules[component], path))
        for name, (component, path) in layers.items()
        if picked(name, include, exclude)
    }


def initial_tensors(
    dit,
    conditioner,
    rank: int,
    adapter_type: str = "lora",
    include=None,
    exclude=None,
    key=None,
) -> dict:
    """A new adapter's tensors, {official layer name: {tensor name: array}}, on the
    layers `include`/`exclude` pick, initialised as 0.0.20 does: A ~ U(+-1/sqrt(fan_in))
    (kaiming_uniform with a = sqrt 5), B = 0, M = 0 (with the -xs bases U, V), the
    magnitudes the norms of W's rows or columns; so the model starts as it was."""
    modules = {"dit": dit, "conditioner": conditioner}
    keys = iter(mx.random.split(mx.random.key(0) if key is None else key, 10_000))
    layers = {}
    for name, (component, path) in official_layers(
        len(dit.layers), conditioner.numbers
    ).items():
        if picked(name, include, exclude):
            weight = _dense_weight(_chain(_module(modules[component], path))[1])
            layers[name] = _initial(weight, rank, adapter_type, next(keys))
    return layers


def _initial(weight: mx.array, rank: int, kind: str, key) -> dict:
    """One layer's initial adapter tensors (see initial_tensors)."""
    out_dim, in_dim = weight.shape
    if kind.endswith("-xs"):
        tensors = {"M_xs": mx.zeros((rank, rank))}
        tensors["U"], tensors["V"] = cached_bases(weight, rank)
    else:
        bound = 1 / math.sqrt(in_dim)
        tensors = {
            "lora_A": mx.random.uniform(-bound, bound, (rank, in_dim), key=key),
            "lora_B": mx.zeros((out_dim, rank)),
        }
    rows, cols = mx.linalg.norm(weight, axis=1), mx.linalg.norm(weight, axis=0)
    form = kind.removesuffix("-xs")
    if form == "bora":
        tensors.update(magnitude_r=rows, magnitude_c=cols)
    elif form != "lora":
        tensors["magnitude"] = rows if form == "dora-rows" else cols
    return tensors


def save_adapter(path, layers: dict, lora_config: dict):
    """Write an adapter file as stable-audio-tools 0.0.20's save_lora_safetensors does:
    {official layer name: {tensor name: array}} as float16 tensors under the official
    keys, with `lora_config` (rank, alpha, adapter_type, include, exclude) as JSON
    metadata. The file appears only when complete (written under a temporary name, then
    renamed)."""
    tensors = {
        f"{layer}{KEY}{name}": value.astype(mx.float16)
        for layer, named in layers.items()
        for name, value in named.items()
    }
    write_safetensors(path, tensors, {"lora_config": json.dumps(lora_config)})


def update(kind: str, tensors: dict) -> mx.array:
    """The low-rank update (out, in): B A, or U M V^T for the -xs types."""
    if kind.endswith("-xs"):
        return tensors["U"] @ tensors["M_xs"] @ tensors["V"].T
    return tensors["lora_B"] @ tensors["lora_A"]


def factors(kind: str, v: mx.array, tensors: dict) -> tuple:
    """(row, column) factors, (out,) and (in,) or None, with which an adapter of type
    `kind` rescales V = W + s x update: DoRA-rows m / ||V's rows||, DoRA-cols the same
    over columns, BoRA m_r / ||V's rows|| and then m_c / ||columns of the result||."""
    form = kind.removesuffix("-xs")
    if form == "dora-rows":
        return tensors["magnitude"] / (mx.linalg.norm(v, axis=1) + EPS), None
    if form == "dora-cols":
        return None, tensors["magnitude"] / (mx.linalg.norm(v, axis=0) + EPS)
    if form == "bora":
        row = tensors["magnitude_r"] / (mx.linalg.norm(v, axis=1) + EPS)
        h = v * row[:, None]
        return row, tensors["magnitude_c"] / (mx.linalg.norm(h, axis=0) + EPS)
    return None, None


def adapted_weight(weight: mx.array, kind: str, tensors: dict, scale: float):
    """The weight (out, in) an adapter of type `kind` makes of `weight`, its update
    scaled by `scale` (strength x alpha / rank), as LoRAParametrization does
    (stable_audio_tools/models/lora/model.py): V = W + scale x update, its rows and
    columns then rescaled by `factors`. For the magnitude types, scale 0 returns W
    itself."""
    if scale == 0 and kind.removesuffix("-xs") != "lora":
        return weight
    v = weight + scale * update(kind, tensors)
    row, col = factors(kind, v, tensors)
    if row is not None:
        v = v * row[:, None]
    return v if col is None else v * col[None]


def _chain(layer) -> tuple:
    """The adapters wrapped around a layer, innermost first, and the layer itself."""
    adapters = []
    while isinstance(layer, LoRALinear):
        adapters.append(layer)
        layer = layer.base
    return adapters[::-1], layer


def _dense_weight(layer) -> mx.array:
    """A plain or quantized layer's weight as a float32 (out, in) matrix."""
    if isinstance(layer, nn.QuantizedLinear):
        w = mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            layer.group_size,
            layer.bits,
        )
    else:
        w = layer.weight
    return w.astype(mx.float32).reshape(w.shape[0], -1)


class LoRALinear(nn.Module):
    """A layer with an adapter that stays beside its weight: over a quantized weight
    (which it cannot be merged into), or active only while the noise level is in
    `interval` (then switched inside the compiled step, by the level the DiT passes to
    each call), or being trained (`frozen=False`).

    With W' = diag(row) V diag(col) (V, row and col as in adapted_weight and factors),
    it computes row * (base(col * x) - bias + s (col * x) A^T B^T) + bias, A and B the
    update's factors (V^T and U M for the -xs types). A frozen adapter's factors are
    precomputed for each combination of the gated adapters under it; a trained one's
    follow its tensors."""

    takes_level = True  # the DiT passes it the noise level

    def __init__(self, base, kind, tensors, scale, interval=None, frozen=True):
        super().__init__()
        self.base = base
        self.kind = kind
        self.scale = scale
        self.gated = interval is not None
        self.low, self.high = interval or (0.0, 1.0)
        for name, value in tensors.items():
            setattr(self, name.lower(), value)
        if frozen and kind.removesuffix("-xs") != "lora":
            self._precompute()

    def tensors(self) -> dict:
        """The adapter's tensors, by their names in the files (the -xs bases too)."""
        bases = ("U", "V") if self.kind.endswith("-xs") else ()
        return {name: self[name.lower()] for name in TENSORS[self.kind] + bases}

    def low_rank(self) -> tuple:
        """(A, B) with B A the update: for the -xs types A = V^T, B = U M."""
        if self.kind.endswith("-xs"):
            return self.v.T, self.u @ self.m_xs
        return self.lora_a, self.lora_b

    def _precompute(self):
        """The row and column factors for each combination of the gated adapters
        below (combination k: bit j set when the j-th of them is on)."""
        inner, layer = _chain(self.base)
        gated = [a for a in inner if a.gated]
        rows, cols = [], []
        for k in range(1 << len(gated)):
            on = {id(a): bool(k >> j & 1) for j, a in enumerate(gated)}
            w = _dense_weight(layer)
            for a in inner:
                if on.get(id(a), True):
                    w = adapted_weight(w, a.kind, a.tensors(), a.scale)
            v = w + self.scale * update(self.kind, self.tensors())
            row, col = factors(self.kind, v, self.tensors())
            rows.append(row)
            cols.append(col)
        if rows[0] is not None:
            self.row_factors = mx.stack(rows)
        if cols[0] is not None:
            self.col_factors = mx.stack(cols)
        mx.eval(self.get("row_factors"), self.get("col_factors"))

    def active(self, level: mx.array) -> mx.array:
        return (self.low <= level) & (level <= self.high)

    def _factors(self, level: mx.array) -> tuple:
        """(row, column) factors now (None where the type has none)."""
        if "row_factors" not in self and "col_factors" not in self:
            if self.kind.removesuffix("-xs") == "lora":
                return None, None
            # being trained: the factors follow the tensors
            layer = _chain(self.base)[1]
            v = _dense_weight(layer) + self.scale * update(self.kind, self.tensors())
            return factors(self.kind, v, self.tensors())
        gated = [a for a in _chain(self.base)[0] if a.gated]
        k = sum(
            (a.active(level).astype(mx.int32) << j for j, a in enumerate(gated)),
            mx.array(0),
        )
        return tuple(
            mx.take(self[name], k, axis=0) if name in self else None
            for name in ("row_factors", "col_factors")
        )

    def __call__(self, x: mx.array, level: mx.array = None) -> mx.array:
        """The adapted layer's output; `level` is the noise level of the DiT evaluation,
        which gated adapters (and those stacked over them) need."""
        row, col = self._factors(level)
        if self.gated:  # off: no update, unit factors
            on = self.active(level)
            row, col = (None if f is None else mx.where(on, f, 1) for f in (row, col))
        if col is not None:
            x = x * col.astype(x.dtype)
        y = self.base(x, level) if isinstance(self.base, LoRALinear) else self.base(x)
        a, b = self.low_rank()
        h = x @ a.astype(x.dtype).T
        if self.gated:
            h = h * on.astype(h.dtype)
        b = b.astype(x.dtype).T
        if row is None:  # the update added in the matmul's epilogue
            return mx.addmm(y, h, b, alpha=self.scale)
        bias = _chain(self.base)[1].get("bias")  # the factors scale the weight only
        out = mx.addmm(y if bias is None else y - bias, h, b, alpha=self.scale)
        out = out * row.astype(x.dtype)
        return out if bias is None else out + bias


def apply_adapter(
    dit,
    conditioner,
    adapter: AdapterFile,
    strength: float = 1.0,
    interval: tuple = None,
    layer_filter: str = "",
):
    """Apply `adapter` at `strength` on top of what is applied already. `interval` (MIN,
    MAX) limits it to the DiT evaluations whose noise level is within it (the
    conditioner's adapters, as in 0.0.20, are never gated); `layer_filter` (0.0.20's
    comma-separated patterns of DiT layer names, e.g. "transformer.layers.[0-5].")
    leaves the matching DiT layers alone. Always-on adapters are merged into
    floating-point weights; the others wrap their layers."""
    if strength == 0:  # 0.0.20: LoRA adds zero, DoRA returns W unchanged
        return
    if interval is not None:
        dit.gated_adapters = True
    layers = official_layers(len(dit.layers), conditioner.numbers)
    patterns = filter_patterns(layer_filter)
    modules = {"dit": dit, "conditioner": conditioner}
    merged, beside = [], []
    for name in adapter.layers:
        component, path = layers[name]
        if component == "dit" and matches(name[len("model.") :], patterns):
            continue  # the filter names layers as under DiffusionTransformer
        layer = _module(modules[component], path)
        gated = interval if component == "dit" else None
        mergeable = gated is None and type(layer) in (nn.Linear, nn.Conv1d)
        (merged if mergeable else beside).append((name, component, path, layer, gated))
    scale = adapter.scale * strength
    for name, component, path, layer, _ in merged:
        tensors = adapter.layers[name]
        w = adapted_weight(_dense_weight(layer), adapter.adapter_type, tensors, scale)
        layer.weight = w.reshape(layer.weight.shape).astype(layer.weight.dtype)
        mx.eval(layer.weight)  # one layer at a time: the old weight is freed now
        _merged_adapters(modules[component]).add(name)
    wrapped = {"dit": [], "conditioner": []}
    for name, component, path, layer, gated in beside:
        tensors, kind = adapter.layers[name], adapter.adapter_type
        wrapped[component].append(
            (path, LoRALinear(layer, kind, tensors, scale, gated))
        )
    for component, items in wrapped.items():
        if items:
            modules[component].update_modules(tree_unflatten(items))


def _merged_adapters(module) -> set:
    """The layers of `module` (official names) whose weights an adapter was merged
    into."""
    if not hasattr(module, "merged_adapters"):
        module.merged_adapters = set()
    return module.merged_adapters
