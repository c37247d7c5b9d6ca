"""Model weights on the device, kept in their GGUF quantized form.

Matrices that read the same input are fused at load (Q|K|V, gate|up) when they share a quantization type, so
one matrix-vector pass serves them all. Types without a matrix-vector kernel are expanded to f16 once, with a
one-line warning.

On a GPU every matrix lives in one allocation (`_DeviceArena`), sized from the file's tensor table before
anything is read: a few hundred tensors allocated one by one would each be rounded up by the caching allocator
(a block it cannot split usefully goes whole, up to 1 MiB more) and leave split segments behind; on a 7B model
that was ~0.05 GiB of the 6 GiB budget.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from tqdm import tqdm

from ..gguf import GGUFFile, dequantize
from ..kernels.quant_weight import MATVEC_TYPES, QuantWeight, pack_weight
from ..models import ModelConfig


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D] f32
    qkv: list[QuantWeight]  # [q|k|v] fused per run of equal type: usually one matrix, at most three
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hkv) Dh] f32 (qwen2)
    q_norm: torch.Tensor | None  # [Dh] f32 (qwen3)
    k_norm: torch.Tensor | None
    attn_output: QuantWeight
    ffn_norm: torch.Tensor
    gate_up: list[QuantWeight]  # [gate|up] fused when their types agree, else two
    ffn_down: QuantWeight


@dataclass
class DeviceWeights:
    token_embd: QuantWeight  # [vocab, D], rows gathered straight from the quantized blocks
    layers: list[LayerWeights]
    output_norm: torch.Tensor
    output: QuantWeight  # [vocab, D]; the same object as token_embd when embeddings are tied

    @property
    def nbytes(self) -> int:
        return (sum(w.nbytes for w in self.matrices())
                + sum(t.numel() * t.element_size() for t in self.vectors()))

    def matrices(self):
        """Every weight matrix; the embedding once, also when it is the LM head (tied)."""
        yield self.token_embd
        if self.output is not self.token_embd:
            yield self.output
        yield from self.layer_matrices()

    def layer_matrices(self):
        """The layers' projections, in order: the matrices a pass multiplies for every token."""
        for layer in self.layers:
            yield from (*layer.qkv, layer.attn_output, *layer.gate_up, layer.ffn_down)

    def vectors(self):
        """Every norm weight and bias."""
        yield self.output_norm
        for layer in self.layers:
            yield from (t for t in (layer.attn_norm, layer.ffn_norm, layer.qkv_bias, layer.q_norm, layer.k_norm)
                        if t is not None)


ARENA_ALIGN = 256  # bytes: each packed field starts where a separate allocation would (16-byte loads and more)


class _DeviceArena:
    """One device buffer that packed weight fields are copied into, each at the next ARENA_ALIGN boundary."""

    def __init__(self, nbytes: int, device: torch.device):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.used = 0

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of the contiguous CPU tensor t inside the buffer (same dtype and shape)."""
        start = -(-self.used // ARENA_ALIGN) * ARENA_ALIGN
        nbytes = t.numel() * t.element_size()
        if start + nbytes > self.buffer.numel():  # the size bound below is wrong: a bug, not a user error
            raise RuntimeError(f"weight arena of {self.buffer.numel()} bytes overflows at {start + nbytes}")
        view = self.buffer[start:start + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        self.used = start + nbytes
        return view


def arena_bytes(gguf_file: GGUFFile) -> int:
    """An upper bound of the packed bytes of every matrix (2-D tensor) of the file, alignment included: a packed
    matrix keeps its GGUF size (kernels/quant_weight), one expanded to f16 takes 2 bytes a weight, and each of
    its at most 7 fields may start up to ARENA_ALIGN - 1 bytes late. Fusing matrices only merges their fields."""
    total = 0
    for info in gguf_file.tensors.values():
        if len(info.shape) != 2:
            continue
        n_cols, n_rows = info.shape
        total += (info.nbytes if info.ggml_type in MATVEC_TYPES else 2 * n_rows * n_cols) + 7 * ARENA_ALIGN
    return total


class _Loader:
    def __init__(self, gguf_file: GGUFFile, device: torch.device, progress: bool):
        self.file = gguf_file
        self.device = device
        self.arena = _DeviceArena(arena_bytes(gguf_file), device) if device.type == "cuda" else None
        total = sum(info.nbytes for info in gguf_file.tensors.values())
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
                        leave=False)
        self.expanded: list[str] = []

    def vector(self, name: str) -> torch.Tensor:
        info = self.file.tensors[name]
        self.bar.update(info.nbytes)
        return torch.from_numpy(dequantize(info, self.file.tensor_data(name))).to(self.device)

    def raw_rows(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray, int]:
        """(type, uint8 [n_rows, row_bytes], n_cols) of a 2-D weight; unsupported types expanded to f16."""
        info = self.file.tensors[name]
        n_cols, n_rows = info.shape
        self.bar.update(info.nbytes)
        data = self.file.tensor_data(name)
        if info.ggml_type in MATVEC_TYPES:
            return info.ggml_type, data.reshape(n_rows, -1), n_cols
        self.expanded.append(f"{name} ({info.type_name})")
        halves = dequantize(info, data).astype(np.float16)
        return GGMLQuantizationType.F16, halves.view(np.uint8).reshape(n_rows, -1), n_cols

    def matrices(self, names: list[str]) -> list[QuantWeight]:
        """Pack `names` row-concatenated, one fused matrix per run of equal (type, width).

        Q|K|V usually fuse whole; in Q4_K_M some layers keep V in Q6_K, giving [Q|K] and [V].
        """
        parts = [self.raw_rows(n) for n in names]
        fused: list[QuantWeight] = []
        run = [parts[0]]
        for part in parts[1:] + [None]:
            if part is not None and (part[0], part[2]) == (run[0][0], run[0][2]):
                run.append(part)
                continue
            ggml_type, _, n_cols = run[0]
            rows = np.concatenate([r for _, r, _ in run], axis=0) if len(run) > 1 else run[0][1]
            fused.append(self._to_device(pack_weight(ggml_type, rows, n_cols)))
            run = [part]
        return fused

    def _to_device(self, w: QuantWeight) -> QuantWeight:
        if self.arena is None:
            return w.to(self.device)
        return dataclasses.replace(w, **{name: self.arena.place(t) for name, t in w.tensors().items()})


def load_device_weights(gguf_file: GGUFFile, config: ModelConfig, device: torch.device,
                        progress: bool = True) -> DeviceWeights:
    loader = _Loader(gguf_file, device, progress)
    with loader.bar:
        token_embd = loader.matrices(["token_embd.weight"])[0]
        layers = [_load_layer(loader, config, i) for i in range(config.num_layers)]
        output_norm = loader.vector("output_norm.weight")
        output = token_embd if config.tied_embeddings else loader.matrices(["output.weight"])[0]
    if loader.expanded:
        warnings.warn(f"no quantized kernel for {len(loader.expanded)} tensors, expanded to f16: "
                      f"{', '.join(loader.expanded[:3])}{' ...' if len(loader.expanded) > 3 else ''}",
                      stacklevel=2)
    return DeviceWeights(token_embd, layers, output_norm, output)


def _load_layer(loader: _Loader, config: ModelConfig, i: int) -> LayerWeights:
    p = f"blk.{i}."
    qkv_names = [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]
    bias = None
    if config.has_qkv_bias:
        bias = torch.cat([loader.vector(p + f"attn_{x}.bias") for x in "qkv"])
    return LayerWeights(
        attn_norm=loader.vector(p + "attn_norm.weight"),
        qkv=loader.matrices(qkv_names),
        qkv_bias=bias,
        q_norm=loader.vector(p + "attn_q_norm.weight") if config.has_qk_norm else None,
        k_norm=loader.vector(p + "attn_k_norm.weight") if config.has_qk_norm else None,
        attn_output=loader.matrices([p + "attn_output.weight"])[0],
        ffn_norm=loader.vector(p + "ffn_norm.weight"),
        gate_up=loader.matrices([p + "ffn_gate.weight", p + "ffn_up.weight"]),
        ffn_down=loader.matrices([p + "ffn_down.weight"])[0],
    )
