"""Launch shapes of the decode step's integer-dot GEMVs (kernels/quant_matvec_q8), chosen by measurement at load.

Which shape is fastest (rows a program, row tiles sharing a thread's activation loads, chunks a step, warps)
depends on the matrix's type and shape and on the GPU: a 4096-row matrix spreads few programs over the SMs,
a 22016-row one many. `tune_gemv_shapes` times a few candidate shapes for every distinct (type, shape) of the
model's quantized matrices, each over all the matrices of that shape in one CUDA-graph replay (a step's access
pattern: every layer's weights once, nothing from L2), and keeps the fastest per shape and activation form.

The choices are kept in a `GemvShapeCache` file per GPU and software versions, as the prefill tuning's are: a
model loaded again reuses them without timing, and two loads pick the same shapes, so their decodes agree bit
for bit (shapes that sum in another order can differ in the last bits).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from gguf import GGMLQuantizationType

from ..kernels import float_matvec as fm
from ..kernels.int8_activations import QuantizedActivations, quantize_activations
from ..kernels.quant_matvec_q8 import (
    DEFAULT_BLOCK_N,
    DEFAULT_CHUNKS,
    DEFAULT_NUM_WARPS,
    DEFAULT_ROWS,
    ROW_TILE_TYPES,
    SUPPORTED_TYPES,
    quant_matvec_q8,
)
from ..kernels.quant_weight import QuantWeight
from .json_cache import JsonCache

FORMS = {"16bit": True, "int8": False}  # activation form -> QuantizedActivations.wide


@dataclass(frozen=True)
class GemvShape:
    """A launch shape of quant_matvec_q8: block_n rows a tile, `rows` tiles a program, `chunks` a step."""

    block_n: int
    chunks: int
    num_warps: int
    rows: int = 1

    def launch_args(self) -> dict:
        return asdict(self)


DEFAULT_SHAPE = GemvShape(DEFAULT_BLOCK_N, DEFAULT_CHUNKS, DEFAULT_NUM_WARPS, DEFAULT_ROWS)
# The candidates timed: the kernel's default first (it wins ties), then the shapes that led the launch-shape
# sweep on an H100 (benchmarks/results/2026-12-07-h100-c/sweep_gemv.json, 16-bit activations): 4 row tiles of
# 1 row on 1 warp for the large Q4_K matrices (2.22 vs 1.57 TB/s at the default), of 1 row on 2 warps with 64
# chunks for the long rows of ffn_down, of 2 rows for Q6_K, and the best shapes without row tiles (Q8_0).
CANDIDATES = (DEFAULT_SHAPE, GemvShape(1, 32, 1, 4), GemvShape(1, 64, 2, 4), GemvShape(2, 32, 2, 4),
              GemvShape(4, 32, 4, 2), GemvShape(4, 64, 4, 1), GemvShape(2, 32, 4, 1), GemvShape(1, 32, 1, 2))


# F16 / BF16 (kernels/float_matvec, chunks of 8 weights): its default first, then more or fewer rows a thread.
FLOAT_DEFAULT_SHAPE = GemvShape(fm.DEFAULT_BLOCK_N, fm.DEFAULT_CHUNKS, fm.DEFAULT_NUM_WARPS, fm.DEFAULT_ROWS)
FLOAT_CANDIDATES = (FLOAT_DEFAULT_SHAPE, GemvShape(1, 32, 1, 4), GemvShape(2, 32, 2, 4), GemvShape(1, 64, 2, 2),
                    GemvShape(1, 128, 4, 4), GemvShape(2, 64, 4, 2), GemvShape(4, 32, 4, 1), GemvShape(2, 32, 2, 2))


def is_float(ggml_type) -> bool:
    return ggml_type in fm.SUPPORTED_TYPES


def candidates_for(ggml_type) -> list[GemvShape]:
    """The candidate shapes of the type's kernel: FLOAT_CANDIDATES for F16 / BF16, else CANDIDATES (row tiles
    only for ROW_TILE_TYPES), without repeats."""
    if is_float(ggml_type):
        return list(FLOAT_CANDIDATES)
    shapes = []
    for shape in CANDIDATES:
        if shape.rows != 1 and ggml_type not in ROW_TILE_TYPES:
            shape = GemvShape(shape.block_n, shape.chunks, shape.num_warps, 1)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def shape_key(w: QuantWeight, form: str) -> tuple[str, int, int, str]:
    return (w.ggml_type.name, w.n_rows, w.n_cols, form)


@dataclass
class GemvShapes:
    """(type, n_rows, n_cols, form) -> the chosen shape, with what was measured (ms per candidate)."""

    table: dict[tuple[str, int, int, str], GemvShape] = field(default_factory=dict)
    timings: dict[tuple[str, int, int, str], dict[GemvShape, float]] = field(default_factory=dict)

    def launch_args(self, w: QuantWeight, form: str, batch: int) -> dict:
        """The shape arguments of `w`'s GEMV (quant_matvec_q8, or float_matvec with form "f32") for activations
        of `form`: the tuned shape at batch 1 (the batch tuned for), none (the kernel's defaults) for shapes not
        measured and larger batches."""
        if batch != 1:
            return {}
        shape = self.table.get(shape_key(w, form))
        return shape.launch_args() if shape is not None else {}

    def as_json(self) -> list[dict]:
        return [{"type": k[0], "n_rows": k[1], "n_cols": k[2], "form": k[3], "shape": asdict(shape),
                 "ms": {_shape_name(s): round(ms, 5) for s, ms in self.timings.get(k, {}).items()}}
                for k, shape in self.table.items()]


def _shape_name(shape: GemvShape) -> str:
    return f"n{shape.block_n}x{shape.rows}-c{shape.chunks}-w{shape.num_warps}"


class GemvShapeCache(JsonCache):
    """Chosen shapes by (type, n_rows, n_cols, form), in a JSON file (runner/json_cache)."""

    VERSION = 1
    WHAT = "GEMV tuning cache"

    @staticmethod
    def _key(key: tuple[str, int, int, str]) -> str:
        return f"{key[0]}:{key[1]}x{key[2]}:{key[3]}"

    def get(self, key: tuple[str, int, int, str]) -> GemvShape | None:
        entry = self.entries.get(self._key(key))
        try:
            shape = GemvShape(**entry)
        except TypeError:
            return None  # absent or malformed: measure it
        if shape not in candidates_for(GGMLQuantizationType[key[0]]):
            return None  # not a shape this version would choose (or a hand-edited one)
        return shape

    def put(self, key: tuple[str, int, int, str], shape: GemvShape) -> None:
        self.put_entry(self._key(key), asdict(shape))


def matrices_by_shape(matrices: Iterable[QuantWeight]) -> dict[tuple[str, int, int], list[QuantWeight]]:
    """The matrices of quant_matvec_q8's and float_matvec's types grouped by (type, n_rows, n_cols), each once,
    in model order."""
    groups: dict[tuple[str, int, int], list[QuantWeight]] = {}
    for w in matrices:
        if w.ggml_type in SUPPORTED_TYPES or fm.supports(w):
            group = groups.setdefault((w.ggml_type.name, w.n_rows, w.n_cols), [])
            if not any(w is other for other in group):
                group.append(w)
    return groups


def replay_ms(body: Callable[[], object], replays: int = 10) -> float:
    """Median milliseconds of one CUDA-graph replay of `body` (warmed up first: that also compiles)."""
    from .graph import capture_after_warm_up

    graph, _ = capture_after_warm_up(body)
    graph.replay()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def tune_gemv_shapes(matrices: Iterable[QuantWeight], forms: Iterable[str] = ("16bit",),
                     cache: GemvShapeCache | None = None,
                     timer: Callable[[Callable[[], object]], float] = replay_ms,
                     progress: bool = False) -> GemvShapes:
    """Time every candidate shape (candidates_for) of each distinct matrix shape, over all the matrices of that
    shape at once, with `timer` (ms of a body: CUDA-graph replays by default), and keep the fastest: the
    integer-dot types against activations of each form in `forms` (keys of FORMS), F16 / BF16 once, against f32
    activations (form "f32"). Choices found in `cache` are not measured again; new ones are added to it and
    saved. A candidate that fails (a shape the GPU cannot hold) is skipped with a warning; the default shape
    is kept where none ran. `progress`: a bar over the candidates to time (each compiles its kernel first)."""
    from tqdm import tqdm

    shapes = GemvShapes()
    forms = tuple(forms)
    todo = []  # (key, the matrices of that shape) still to measure
    for (type_name, n_rows, n_cols), group in matrices_by_shape(matrices).items():
        for form in ("f32",) if is_float(group[0].ggml_type) else forms:
            key = (type_name, n_rows, n_cols, form)
            cached = cache.get(key) if cache is not None else None
            if cached is not None:
                shapes.table[key] = cached
            else:
                todo.append((key, group))
    total = sum(len(candidates_for(group[0].ggml_type)) for _, group in todo)
    with tqdm(total=total, desc="tuning decode GEMVs", unit="shape", disable=not progress or not total,
              leave=False) as bar:
        for key, group in todo:
            _, n_rows, n_cols, form = key
            device = group[0].qs.device
            floats = is_float(group[0].ggml_type)
            x = torch.randn(1, n_cols, generator=torch.Generator().manual_seed(n_cols)).to(device)
            out = torch.empty(1, n_rows, device=device)
            if floats:
                def gemv(w, args, x=x, out=out):
                    fm.float_matvec(x, w, out, **args)
            else:
                xq = quantize_activations(x, QuantizedActivations.allocate(1, n_cols, device, wide=FORMS[form]))

                def gemv(w, args, xq=xq, out=out):
                    quant_matvec_q8(xq, w, out, **args)
            timings = {}
            for shape in candidates_for(group[0].ggml_type):
                def body(args=shape.launch_args()):
                    for w in group:
                        gemv(w, args)
                try:
                    timings[shape] = timer(body)
                except Exception as exc:  # e.g. registers or shared memory this GPU does not have
                    warnings.warn(f"decode GEMV shape {shape} failed for {key} ({exc!r:.200})", stacklevel=2)
                bar.update(1)
            ran = {s: ms for s, ms in timings.items() if math.isfinite(ms)}
            default = FLOAT_DEFAULT_SHAPE if floats else DEFAULT_SHAPE
            best = min(ran, key=ran.get) if ran else default  # min keeps the first (the default) on ties
            shapes.table[key] = best
            shapes.timings[key] = timings
            if cache is not None and ran:
                cache.put(key, best)
    if cache is not None:
        cache.save()
    return shapes
