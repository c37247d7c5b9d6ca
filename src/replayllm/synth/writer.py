"""Stream a synthetic GGUF to disk: header and tensor infos first, then each tensor's data in order,
generated and quantized in row chunks by a process pool. Memory stays at a few chunks per worker
whatever the model size.

Weights are drawn from N(0, 0.02^2) (norm weights from 1 + N(0, 0.02^2)) with a generator seeded by
(seed, tensor index, chunk index); chunk boundaries depend only on the tensor's shape, so a given
seed gives the same float weights for every quantization and any number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from tqdm import tqdm

from ..errors import InvalidParameterError, ReplayLLMError
from .quantize import quantize_tensor
from .recipe import QuantMix, get_mix, tensor_type
from .shapes import ModelShape, TensorSpec, get_shape, tensor_specs
from .vocab import build_vocab

WEIGHT_STD = 0.02
QUANTIZATION_VERSION = 2  # general.quantization_version of current ggml block layouts
_CHUNK_VALUES = 1 << 22  # values generated per task: 16 MiB of float32


@dataclass(frozen=True)
class TensorPlan:
    spec: TensorSpec
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        *lead, cols = self.spec.numpy_shape
        rows = int(np.prod(lead)) if lead else 1
        return rows * (cols // block) * type_size


@dataclass(frozen=True)
class _ChunkTask:
    """One worker job: rows [row_start, row_start + num_rows) of one tensor."""

    seed: int
    tensor_index: int
    chunk_index: int
    num_rows: int
    num_cols: int
    is_norm: bool
    qtype: int


def plan_tensors(shape: ModelShape, mix: QuantMix) -> list[TensorPlan]:
    """Every tensor of `shape` with the block type the recipe gives it."""
    return [TensorPlan(spec, tensor_type(mix, spec, shape.num_layers)) for spec in tensor_specs(shape)]


def write_synthetic_model(shape: str, quant: str, out_path: str | os.PathLike, *, seed: int = 0,
                          progress: bool = True, workers: int | None = None, overwrite: bool = False) -> Path:
    """Write a random-weight GGUF with the shapes, metadata, vocab and quantization mix of `shape`.

    Returns the path written. Refuses to replace an existing file unless `overwrite`; the data goes
    to a temporary file in the same folder, renamed into place only when complete.
    """
    return write_model(get_shape(shape), quant, out_path, seed=seed, progress=progress, workers=workers,
                       overwrite=overwrite)


def write_model(shape: ModelShape, quant: str, out_path: str | os.PathLike, *, seed: int = 0,
                progress: bool = True, workers: int | None = None, overwrite: bool = False) -> Path:
    """`write_synthetic_model` for a `ModelShape` that need not be in `SHAPES`."""
    mix = get_mix(quant)
    if not isinstance(seed, int) or seed < 0:
        raise InvalidParameterError(f"seed must be a non-negative integer, got {seed!r}")
    workers = _resolve_workers(workers)
    out = Path(out_path)
    _check_destination(out, overwrite)
    plan = plan_tensors(shape, mix)
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    writer = GGUFWriter(partial, arch=shape.arch)
    _add_metadata(writer, shape, mix, seed)
    for item in plan:
        writer.add_tensor_info(item.spec.name, item.spec.numpy_shape, np.dtype(np.float32), item.nbytes,
                               raw_dtype=item.qtype)
    try:
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensor_data(writer, plan, seed, workers, progress, desc=out.name)
        finally:
            writer.close()
        _move_into_place(partial, out, overwrite)
    except BaseException as error:  # an interrupted run too: never leave a partial file behind
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError):  # unwritable folder, full disk, ...
            raise ReplayLLMError(f"cannot write {out}: {error.strerror or error}") from error
        raise
    return out


def _resolve_workers(workers: int | None) -> int:
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(workers, int) or workers < 1:
        raise InvalidParameterError(f"workers must be a positive integer, got {workers!r}")
    return workers


def _check_destination(out: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise InvalidParameterError(f"{out}: folder {out.parent} does not exist; create it first")
    if out.is_dir():
        raise InvalidParameterError(f"{out} is a folder; give a file path such as {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise InvalidParameterError(f"{out} already exists; choose another path or allow overwriting it")


def _move_into_place(partial: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(partial, out)
        return
    # A hard link creates `out` only if it does not exist, atomically, so a file that appeared
    # while we were writing is never clobbered.
    try:
        os.link(partial, out)
    except FileExistsError:
        raise InvalidParameterError(f"{out} appeared while writing; choose another path or allow overwriting it")
    except OSError:  # no hard links on this file system
        if out.exists():
            raise InvalidParameterError(f"{out} appeared while writing; choose another path or allow "
                                        "overwriting it") from None
        os.replace(partial, out)
        return
    partial.unlink()


def _add_metadata(writer: GGUFWriter, shape: ModelShape, mix: QuantMix, seed: int) -> None:
    writer.add_type("model")
    writer.add_name(f"synthetic {shape.name} {mix.name}")
    writer.add_basename(shape.name)  # what benchmark tables and result files call the model
    writer.add_description(f"random weights (normal, std {WEIGHT_STD}, seed {seed}) with the shapes of {shape.name}")
    writer.add_file_type(int(mix.file_type))
    writer.add_quantization_version(QUANTIZATION_VERSION)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_block_count(shape.num_layers)
    writer.add_feed_forward_length(shape.ffn_size)
    writer.add_head_count(shape.num_heads)
    writer.add_head_count_kv(shape.num_kv_heads)
    writer.add_layer_norm_rms_eps(shape.rms_norm_eps)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_rope_dimension_count(shape.head_dim)
    _add_vocab(writer, shape)


def _add_vocab(writer: GGUFWriter, shape: ModelShape) -> None:
    spec = shape.vocab
    vocab = build_vocab(spec, shape.vocab_size)
    writer.add_tokenizer_model(spec.model)
    writer.add_tokenizer_pre(spec.pre)
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    if vocab.scores is not None:
        writer.add_token_scores(list(vocab.scores))
    if vocab.merges is not None:
        writer.add_token_merges(list(vocab.merges))
    writer.add_bos_token_id(vocab.bos_token_id)
    writer.add_eos_token_id(vocab.eos_token_id)
    if vocab.unknown_token_id is not None:
        writer.add_unk_token_id(vocab.unknown_token_id)
    writer.add_add_bos_token(spec.add_bos_token)
    writer.add_add_eos_token(False)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)


def _write_tensor_data(writer: GGUFWriter, plan: list[TensorPlan], seed: int, workers: int, progress: bool,
                       desc: str) -> None:
    """Write every tensor's bytes in order, padded to the alignment the tensor infos promised."""
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    tasks = list(_chunk_tasks(plan, seed))
    sizes = {i: item.nbytes for i, item in enumerate(plan)}
    written = dict.fromkeys(sizes, 0)

    def results(pool) -> Iterator[np.ndarray]:
        if pool is None:
            return map(_make_chunk, tasks)
        return pool.imap(_make_chunk, tasks, chunksize=1)

    pool = _pool(workers) if workers > 1 and len(tasks) > 1 else None
    try:
        with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                  disable=not progress) as bar:
            for task, data in zip(tasks, results(pool)):
                data.tofile(fout)
                written[task.tensor_index] += data.nbytes
                if written[task.tensor_index] == sizes[task.tensor_index]:
                    writer.write_padding(fout, sizes[task.tensor_index])
                bar.update(data.nbytes)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if written != sizes:
        raise AssertionError(f"tensor data sizes differ from the tensor infos: {written} vs {sizes}")


def _pool(workers: int):
    # fork starts workers in milliseconds and does not re-import the package; spawn where fork is absent.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return context.Pool(workers)


def _chunk_tasks(plan: list[TensorPlan], seed: int) -> Iterator[_ChunkTask]:
    for tensor_index, item in enumerate(plan):
        *lead, cols = item.spec.numpy_shape
        rows = int(np.prod(lead)) if lead else 1
        rows_per_chunk = max(1, _CHUNK_VALUES // cols)
        for chunk_index, start in enumerate(range(0, rows, rows_per_chunk)):
            yield _ChunkTask(seed, tensor_index, chunk_index, min(rows_per_chunk, rows - start), cols,
                             item.spec.is_norm, int(item.qtype))


def _make_chunk(task: _ChunkTask) -> np.ndarray:
    """Generate and quantize one chunk: [num_rows, bytes_per_row] uint8."""
    rng = np.random.default_rng((task.seed, task.tensor_index, task.chunk_index))
    values = rng.standard_normal((task.num_rows, task.num_cols), dtype=np.float32)  # [rows, cols]
    values *= np.float32(WEIGHT_STD)
    if task.is_norm:
        values += np.float32(1.0)
    return quantize_tensor(values, GGMLQuantizationType(task.qtype))
