"""The GPU backend: quantized weights on the device, paged KV cache, GPU prefill, and the decode modes.

- "graph" (default): the decode step, sampling included, is one replayed CUDA graph. The host runs one step
  ahead: it queues replay k+1 before it waits for the token of step k (an asynchronous copy into pinned memory),
  so the GPU never idles while the host detokenizes and checks stop conditions.
- "eager": the same kernels launched one by one every token, the logits copied to the host and sampled there:
  the per-token CPU work the graph mode removes, kept as the baseline it is measured against.
- "graph-host-sampling": the graph stops at the logits, which are sampled on the host (isolates sampling).
- "graph-Nstep": N decode steps captured in one graph (fewer replays; tokens reach the host N at a time).

In every mode, a prompt chunk that gives only its last position's logits is prefilled by one replay of a
captured pass (runner/prefill_graph) unless `prefill_graphs` is off; all-position logits run launch by launch.
"""

from __future__ import annotations

import gc
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..default_model import cache_dir
from ..errors import InvalidParameterError
from ..gguf import dequantize
from ..runner.decode_step import RopeTables, StepBuffers, check_activation_form, decode_step, default_activations
from ..runner.gemv_tuning import GemvShapeCache, GemvShapes, tune_gemv_shapes
from ..runner.graph import DecodeGraph
from ..runner.kv_cache import PagedKVCache
from ..runner.prefill import Prefiller
from ..runner.prefill_graph import PrefillGraphs
from ..runner.prefill_tuning import TuningCache
from ..runner.weights import load_device_weights
from ..sampling import SamplerState, SamplingParams, sampler_for
from .backend import Backend
from .decode_mode import MAX_STEPS_PER_GRAPH, DecodeMode
from .model_file import ModelFile
from .tracer import TokenTracer

PINNED_SLOTS = 4  # host slots for sampled tokens in flight; the host lags the GPU by one replay
PREFILL_CHUNK_TOKENS = 2048  # prompt tokens per prefill pass: bounds prefill's activation and attention memory
MIN_AUTO_PREFILL_CHUNK = 128  # the default chunk shrinks no further for memory: smaller passes waste the GPU
# Kept free beside a prefill pass, besides the prefill scratch, when the chunk is chosen: cuBLAS's workspace
# (made by the first vendor GEMM, 32 MiB on Hopper), the sampler state and the decode graphs' pools (4 MiB for
# llama2-7B), and the caching allocator's slack (a large block can come up to 1 MiB bigger than asked for).
PREFILL_HEADROOM_BYTES = 48 * 2**20


@dataclass(frozen=True)
class MemoryReport:
    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int  # step buffers, prefill scratch, CUDA-graph pools, rope tables
    prefill_chunk_tokens: int
    prefill_peak_bytes: int  # allocated while a prefill pass of a whole chunk runs, on top of the rest
    # Held by the captured prefill passes' pool (reserved, not allocated between passes): a pass of a whole
    # chunk runs inside it. 0 without prefill graphs, where a pass takes prefill_peak_bytes while it runs.
    prefill_graph_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes + self.prefill_graph_bytes

    def __str__(self) -> str:
        gib = 2**30
        parts = (f"GPU memory: weights {self.weights_bytes / gib:.2f} GiB, KV cache {self.kv_cache_bytes / gib:.2f} "
                 f"GiB, workspace {self.workspace_bytes / gib:.2f} GiB")
        if self.prefill_graph_bytes:
            return (f"{parts}, prefill graphs {self.prefill_graph_bytes / gib:.2f} GiB (chunks of up to "
                    f"{self.prefill_chunk_tokens} tokens), total {self.total_bytes / gib:.2f} GiB")
        return (f"{parts}, total {self.total_bytes / gib:.2f} GiB; prefill chunk {self.prefill_chunk_tokens} tokens, "
                f"~{self.prefill_peak_bytes / gib:.2f} GiB more at its peak")


class GPUBackend(Backend):
    def __init__(self, model_file: ModelFile, max_context_tokens: int, mode: str = "graph",
                 progress: bool = True, device: torch.device | None = None, int8_activations: bool = False,
                 pdl: bool | None = None, prefill_chunk: int | None = None, activations: str | None = None,
                 prefill_graphs: bool = True, kv_cache: str = "f16"):
        """`prefill_chunk`: prompt tokens per prefill pass (already validated, see LLM); None chooses it at load
        (`_default_prefill_chunk`). `prefill_graphs` (CUDA): capture the prefill passes at load. `kv_cache`: the
        cache's element type, "f16", "int8" or "q4" (runner/kv_cache.py; a q4 cache's attention has only the
        CUDA-core products, so it comes with them on)."""
        started = time.perf_counter()
        self.config = config = model_file.config
        self.max_context_tokens = max_context_tokens
        self.device = device or torch.device("cuda")
        self.is_cuda = self.device.type == "cuda"
        self.tracer: TokenTracer | None = None
        base = _allocated(self.device)
        # The most allocated at the end of each load phase (torch's peak counter, never reset here): where a
        # load's peak memory comes from.
        self.load_peaks: dict[str, int] = {}
        self.weights = load_device_weights(model_file.gguf, config, self.device, progress)
        self._note_peak("weights")
        weights_bytes = _allocated(self.device) - base if self.is_cuda else self.weights.nbytes
        # A multi-step graph runs whole replays, so its last one may step up to N - 1 positions past the
        # request's end: the cache, rope tables and attention workspace keep that much slack, so those
        # discarded steps stay inside allocated memory and never touch another sequence's pages.
        capacity = max_context_tokens + MAX_STEPS_PER_GRAPH
        self.cache = PagedKVCache.allocate(config, capacity, 1, self.device, dtype=kv_cache)
        freq_factors = None
        if config.has_rope_freqs:  # Llama 3.x: per-frequency divisors stored as a tensor
            info = model_file.gguf.tensors["rope_freqs.weight"]
            freq_factors = torch.from_numpy(dequantize(info, model_file.gguf.tensor_data(info.name)))
        cos, sin = config.rope_tables(capacity, freq_factors)
        self.rope = RopeTables(cos.to(self.device), sin.to(self.device))
        self.bufs = StepBuffers.allocate(config, 1, self.cache.max_pages_per_seq,
                                         self.cache.max_pages_per_seq * self.cache.page_size, self.device)
        self.bufs.activations = default_activations(self.bufs, self.weights)
        self.bufs.fma_attention_products = self.cache.dtype == "q4"  # its only attention (kernels/decode_attention)
        self._note_peak("kv_cache")
        self.prefiller = Prefiller(config, self.weights, self.cache, self.rope)
        self.prefill_chunk_tokens = (prefill_chunk if prefill_chunk is not None
                                     else self._default_prefill_chunk(progress))
        if self.is_cuda:
            self.prefiller.tune(self.prefill_chunk_tokens, TuningCache(_tuning_cache_path(self.device)))
            self._note_peak("prefill_tuning")
        self.device_sampler = SamplerState.create(1, config.vocab_size, self.device)
        self.host_sampler = SamplerState.create(1, config.vocab_size, torch.device("cpu"))
        self._graphs: dict[tuple[int, bool, bool], DecodeGraph] = {}
        self.one_launch_greedy = True  # the greedy graph's sampling in one launch (set_one_launch_greedy)
        self.load_seconds = time.perf_counter() - started
        if int8_activations or activations is not None:
            self._set_activation_form("int8" if int8_activations else activations)
        self._enable_pdl(self.supports_pdl if pdl is None else pdl)  # None: on wherever the GPU has it
        self._tune_gemv_shapes(progress)
        self.set_mode(mode)
        self._note_peak("graph_capture")
        self.prefill_graphs: PrefillGraphs | None = None
        if self.is_cuda and prefill_graphs:
            # no chunk is longer than the context: no bucket past it
            self.prefill_graphs = PrefillGraphs(self.prefiller, self.bufs.page_table[0],
                                                min(self.prefill_chunk_tokens, max_context_tokens))
        workspace = _allocated(self.device) - base - weights_bytes - self.cache.nbytes if self.is_cuda else 0
        if self.prefill_graphs is not None:  # its pool is measured apart: reserved, hardly any of it allocated
            self._capture_prefill_graphs(progress)
        self.startup_seconds = time.perf_counter() - started
        self.memory = MemoryReport(weights_bytes, self.cache.nbytes, max(workspace, 0), self.prefill_chunk_tokens,
                                   self.prefiller.peak_bytes(self.prefill_chunk_tokens),
                                   self.prefill_graphs.pool_bytes if self.prefill_graphs is not None else 0)
        if progress and self.is_cuda:
            print(f"replayllm: {self.memory}; ready in {self.startup_seconds:.1f} s "
                  f"(load {self.load_seconds:.1f} s)", file=sys.stderr)
        self._pinned = torch.zeros(PINNED_SLOTS, MAX_STEPS_PER_GRAPH, dtype=torch.int64, pin_memory=self.is_cuda)
        self._copied = [torch.cuda.Event() if self.is_cuda else None for _ in range(PINNED_SLOTS)]

    def _capture_prefill_graphs(self, progress: bool) -> None:
        """Capture the prefill passes; where the memory left cannot hold them (another process took some since
        the chunk was chosen), go on without them, said on stderr: passes launched one by one give the same
        logits, only with more host time per chunk."""
        try:
            self.prefill_graphs.capture(progress)
        except torch.OutOfMemoryError as exc:
            self.prefill_graphs = None
            gc.collect()
            torch.cuda.empty_cache()
            first_line = str(exc).split(".")[0]
            print(f"replayllm: prefill passes not captured as CUDA graphs ({first_line}); they run launched one "
                  f"by one", file=sys.stderr)
        self._note_peak("prefill_graphs")

    def _default_prefill_chunk(self, progress: bool) -> int:
        """PREFILL_CHUNK_TOKENS; on a GPU where the memory left, less the prefill scratch still to be made and
        PREFILL_HEADROOM_BYTES, would not hold a pass of that many tokens, the largest power of two whose pass
        it holds (MIN_AUTO_PREFILL_CHUNK at least), said on stderr with `progress`."""
        if not self.is_cuda:
            return PREFILL_CHUNK_TOKENS
        left = memory_left_bytes(self.device) - self.prefiller.pending_scratch_bytes() - PREFILL_HEADROOM_BYTES
        chunk = fitting_prefill_chunk(self.prefiller.peak_bytes, left)
        if chunk < PREFILL_CHUNK_TOKENS and progress:
            gib, full = 2**30, self.prefiller.peak_bytes(PREFILL_CHUNK_TOKENS)
            print(f"replayllm: prefill chunk {chunk} tokens, not {PREFILL_CHUNK_TOKENS}: the GPU memory left after "
                  f"load ({max(left, 0) / gib:.2f} GiB) would not hold a pass of {PREFILL_CHUNK_TOKENS} "
                  f"({full / gib:.2f} GiB)", file=sys.stderr)
        return chunk

    def _note_peak(self, phase: str) -> None:
        if self.is_cuda:
            self.load_peaks[phase] = torch.cuda.max_memory_allocated(self.device)

    @property
    def name(self) -> str:
        untuned = self.is_cuda and self.bufs.gemv_shapes is None  # (benchmarks' baseline: runner/gemv_tuning)
        return (f"cuda-{self.mode.name}-{self.bufs.activations}" + ("-pdl" if self.bufs.pdl else "")
                + ("-prefetch" if self.bufs.pdl and self.bufs.prefetch_weights else "")
                + ("-fused-merge" if self.bufs.fused_attention_merge else "")
                + ("-rope-in-attention" if self.bufs.rope_in_attention else "")
                + ("" if self.cache.dtype == "f16" else f"-kv-{self.cache.dtype}")
                + ("-int8-products" if self.bufs.int8_attention_products else "")
                + ("-fma-products" if self.bufs.fma_attention_products else "")
                + ("" if self.one_launch_greedy else "-torch-greedy")
                + ("-default-shapes" if untuned else ""))

    def set_activations(self, form: str) -> None:
        """The form in which the quantized matrices' GEMVs take their inputs at decode (runner/decode_step.py):
        "16bit" (the default where the model's widths allow), "int8" (faster, its rounding changes greedy
        tokens) or "f32". Recaptures the current mode's graphs, which bake the choice in."""
        self._set_activation_form(form)
        self._tune_gemv_shapes(progress=False)
        self._recapture()

    def _set_activation_form(self, form: str) -> None:
        check_activation_form(form)
        if form != "f32" and not self.bufs.can_quantize_activations:
            raise InvalidParameterError(f"{form} activations need every projection's input width and the head "
                                        "dimension to be multiples of 32")
        self.bufs.activations = form

    def _tune_gemv_shapes(self, progress: bool) -> None:
        """On a GPU, the decode GEMVs' launch shapes for the current activation form and the F16 / BF16 matrices'
        (runner/gemv_tuning): from the cache file, or measured once (a few seconds) and kept there."""
        form = self.bufs.activations
        shapes = self.bufs.gemv_shapes or GemvShapes()
        if not self.is_cuda or (shapes.table and form in {key[3] for key in shapes.table} | {"f32"}):
            return  # the float matrices' shapes come with the first tuning, whatever its form
        started = time.perf_counter()
        cache = GemvShapeCache(_tuning_cache_path(self.device, "gemv-tuning"))
        tuned = tune_gemv_shapes([self.weights.output, *self.weights.layer_matrices()],
                                 () if form == "f32" else (form,), cache, progress=progress)
        shapes.table.update(tuned.table)
        shapes.timings.update(tuned.timings)
        self.bufs.gemv_shapes = shapes
        if progress and tuned.timings:
            print(f"replayllm: launch shapes of {len(tuned.timings)} decode GEMVs ({form} activations) measured in "
                  f"{time.perf_counter() - started:.1f} s, kept for the next load", file=sys.stderr)
        self._note_peak("gemv_tuning")

    def set_int8_activations(self, enabled: bool) -> None:
        """Experimental: Q4_0/Q4_1/Q4_K/Q5_K/Q6_K/Q8_0 matrices multiply int8-quantized activations
        (kernels/quant_matvec_q8.py). Recaptures the current mode's graphs, which bake the choice in."""
        self.set_activations("int8" if enabled else default_activations(self.bufs, self.weights))

    @property
    def supports_pdl(self) -> bool:
        """Programmatic dependent launch needs compute capability 9.0 (Hopper) or later."""
        return self.is_cuda and torch.cuda.get_device_capability(self.device)[0] >= 9

    def set_pdl(self, enabled: bool) -> None:
        """Launch every decode-step kernel with programmatic dependent launch (kernels/pdl.py), so each kernel's
        launch overlaps the end of the one before; on by default where `supports_pdl`. The tokens are the same
        either way (each kernel waits for the one before it before touching memory). Recaptures the current
        mode's graphs, which bake the choice in."""
        self._enable_pdl(enabled)
        self._recapture()

    def set_weight_prefetch(self, enabled: bool) -> None:
        """Experimental: with PDL, each decode GEMV's programs ask L2 for their weight rows before waiting for the
        kernel before (off by default: measured slower). The tokens are the same either way. Recaptures the
        current mode's graphs."""
        self.bufs.prefetch_weights = bool(enabled)
        self._recapture()

    def set_fused_attention_merge(self, enabled: bool) -> None:
        """Experimental: decode attention merges its splits in the same launch (the last split to finish does
        it), one launch a layer fewer than the merge kernel of its own ("-fused-merge"). Off by default:
        measured alike at depth 0 and slower deep in a context (benchmarks/NOTES.md). Recaptures the current
        mode's graphs."""
        self._refuse_beside_fma_products(enabled, "the fused attention merge")
        self.bufs.fused_attention_merge = bool(enabled)
        self._recapture()

    def set_rope_in_attention(self, enabled: bool) -> None:
        """Experimental: decode attention rotates q and k and writes the new token into the KV cache itself, one
        launch a layer fewer than a rope kernel before it ("-rope-in-attention"). Off by default: measured
        slower (benchmarks/NOTES.md). Not with an int8 KV cache (rope_and_cache_write quantizes it). Recaptures
        the current mode's graphs."""
        if enabled and self.cache.dtype != "f16":
            raise InvalidParameterError(f"rope in the attention launch writes an f16 KV cache only; this one is "
                                        f"{self.cache.dtype}")
        self._refuse_beside_fma_products(enabled, "rope in the attention launch")
        self.bufs.rope_in_attention = bool(enabled)
        self._recapture()

    def set_int8_attention_products(self, enabled: bool) -> None:
        """Experimental, with an int8 KV cache: decode attention multiplies the cache's quants in int8 products
        (q and the probabilities rounded to 16-bit integers) instead of converting each tile to f16
        ("-int8-products"; kernels/decode_attention). Not yet measured on a GPU, so off. Recaptures the current
        mode's graphs."""
        if enabled and self.cache.dtype != "int8":
            raise InvalidParameterError("int8 attention products need an int8 KV cache (kv_cache='int8')")
        self._refuse_beside_fma_products(enabled, "int8 attention products")
        self.bufs.int8_attention_products = bool(enabled)
        self._recapture()

    def _refuse_beside_fma_products(self, enabled: bool, name: str) -> None:
        if enabled and self.bufs.fma_attention_products:
            raise InvalidParameterError(f"{name} does not combine with fma attention products; turn them off first")

    def set_fma_attention_products(self, enabled: bool) -> None:
        """Experimental: decode attention takes its products as f32 multiply-adds on the CUDA cores, one program
        per q head, instead of tensor-core products of f16 tiles ("-fma-products"; kernels/decode_attention).
        Not with the fused merge, rope in the attention launch or int8 products. Not yet measured on a GPU, so
        off; always on with a q4 KV cache, whose attention has no other products. Recaptures the current mode's
        graphs."""
        if not enabled and self.cache.dtype == "q4":
            raise InvalidParameterError("a q4 KV cache's attention has the fma products only; they cannot be turned "
                                        "off")
        if enabled:
            for name, chosen in (("the fused attention merge", self.bufs.fused_attention_merge),
                                 ("rope in the attention launch", self.bufs.rope_in_attention),
                                 ("int8 attention products", self.bufs.int8_attention_products)):
                if chosen:
                    raise InvalidParameterError(f"fma attention products do not combine with {name}; turn it off "
                                                f"first")
        self.bufs.fma_attention_products = bool(enabled)
        self._recapture()

    def set_one_launch_greedy(self, enabled: bool) -> None:
        """The all-greedy graphs draw the token, record it and feed it back in one launch (kernels/greedy_sample;
        on by default); off: the torch sampler's ~25 launches ("-torch-greedy"), for comparison. The tokens
        are the same. Recaptures the current mode's graphs."""
        self.one_launch_greedy = bool(enabled)
        self._recapture()

    def _recapture(self) -> None:
        """Drop the captured graphs (they bake in the step's options) and capture the current mode's again."""
        self._graphs.clear()
        self.set_mode(self.mode.name)

    def _enable_pdl(self, enabled: bool) -> None:
        if enabled and not self.supports_pdl:
            raise InvalidParameterError("programmatic dependent launch needs a GPU of compute capability 9.0 or "
                                        "later (Hopper)")
        self.bufs.pdl = bool(enabled)

    def set_mode(self, mode: str) -> None:
        """Switch decode mode; a graph is captured the first time its mode is used and kept."""
        decode_mode = DecodeMode.parse(mode)
        if decode_mode.use_graph:
            if not self.is_cuda:
                raise InvalidParameterError(f"decode mode {mode!r} needs a CUDA device; use mode 'eager'")
            self.graph_for(decode_mode)
            if decode_mode.sample_on_device:
                self.graph_for(decode_mode, greedy=True)
        self.mode = decode_mode

    def graph_for(self, mode: DecodeMode, greedy: bool = False) -> DecodeGraph:
        """The mode's graph, captured on first use; `greedy` picks its variant for all-greedy requests, which
        skips the sampler's sort (only for modes that sample on the device)."""
        greedy = greedy and mode.sample_on_device
        key = (mode.steps_per_graph, mode.sample_on_device, greedy)
        if key not in self._graphs:
            sampler = self.device_sampler if mode.sample_on_device else None
            graph = DecodeGraph(self._step, self.bufs, sampler, mode.steps_per_graph, greedy_only=greedy,
                                one_launch_greedy=self.one_launch_greedy)
            graph.capture()
            self.bufs.positions.zero_()
            self._graphs[key] = graph
        return self._graphs[key]

    def _step(self, bufs: StepBuffers) -> torch.Tensor:
        return decode_step(self.config, self.weights, self.cache, self.rope, bufs)

    @contextmanager
    def sequence(self, num_tokens: int) -> Iterator[None]:
        """Hold KV pages for one sequence of up to `num_tokens` tokens in page-table row 0 while inside; on leaving,
        the pages go back and the row's position is reset (host side: once per request, never per token)."""
        pages = self.cache.reserve(num_tokens)
        try:
            self.cache.fill_page_table_row(self.bufs.page_table, 0, pages)
            yield
        finally:
            self.bufs.positions.zero_()
            self.cache.release(pages)

    # ---- prompt processing ------------------------------------------------------------------------------

    def _prefill_chunks(self, ids: torch.Tensor, chunk_tokens: int, all_logits: bool = False) -> torch.Tensor:
        """Prefill ids [T] (device) into the pages of page-table row 0, chunk by chunk, so that activations and
        attention scratch stay bounded by the chunk whatever the prompt's length. Returns the last position's
        logits [1, vocab] on the device, or with `all_logits` every position's [T, vocab] on the host."""
        rows, logits = [], None
        graphs = None if all_logits else self.prefill_graphs
        for start in range(0, ids.shape[0], chunk_tokens):
            chunk = ids[start:start + chunk_tokens]
            if graphs is not None and chunk.shape[0] <= graphs.max_tokens:
                logits = graphs.run(chunk, start)
                continue
            logits = self.prefiller.run(chunk, self.bufs.page_table[0], start=start, all_logits=all_logits)
            if all_logits:
                rows.append(logits.cpu())
        return torch.cat(rows) if all_logits else logits

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        with self.sequence(len(token_ids)):
            ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
            return self._prefill_chunks(ids, self.prefill_chunk_tokens, all_logits=True)

    @torch.inference_mode()
    def prefill_only(self, token_ids: list[int], chunk_tokens: int) -> None:
        with self.sequence(len(token_ids)):
            ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
            self._prefill_chunks(ids, chunk_tokens)
            if self.is_cuda:
                torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def decode_logits(self, token_ids: list[int], prompt_tokens: int) -> torch.Tensor:
        """Teacher forcing through the decode step, for checks against the reference: prefill
        token_ids[:prompt_tokens], then one eager decode step (the graph's kernels, launched one by one) for each
        later token. Returns [len(token_ids) - prompt_tokens, vocab] f32 on the host: row i is the step's logits
        after token_ids[prompt_tokens + i], the reference's row prompt_tokens + i."""
        if not 1 <= prompt_tokens < len(token_ids):
            raise InvalidParameterError(f"prompt_tokens must be in [1, {len(token_ids) - 1}], got {prompt_tokens}")
        rows = []
        with self.sequence(len(token_ids)):
            ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
            self._prefill_chunks(ids[:prompt_tokens], self.prefill_chunk_tokens)
            self.bufs.positions.fill_(prompt_tokens)
            for i in range(prompt_tokens, len(token_ids)):
                self.bufs.tokens.copy_(ids[i:i + 1])
                logits = self._step(self.bufs)[:1]
                rows.append(logits.to("cpu", torch.float32, copy=True))  # a copy: bufs.logits is overwritten
                self.bufs.positions.add_(1)
        return torch.cat(rows)

    # ---- decoding ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, seed: int,
                     max_new_tokens: int) -> Iterator[int]:
        with self.sequence(len(prompt_ids) + max_new_tokens + self.mode.steps_per_graph):
            ids = torch.tensor(prompt_ids, dtype=torch.int64, device=self.device)
            logits = self._prefill_chunks(ids, self.prefill_chunk_tokens)
            self.bufs.positions.fill_(len(prompt_ids))
            if self.mode.sample_on_device:
                yield from self._decode_run_ahead(logits, params, seed, prompt_ids, max_new_tokens)
            else:
                yield from self._decode_host_sampling(logits, params, seed, prompt_ids, max_new_tokens)

    def _decode_host_sampling(self, logits, params, seed, prompt_ids, max_new_tokens) -> Iterator[int]:
        """Eager and graph-host-sampling: every token the host waits for the logits and samples them."""
        sampler, trace = self.host_sampler, self.tracer
        graph = self.graph_for(self.mode) if self.mode.use_graph else None
        draw = sampler_for(params.is_greedy)  # the host gets the greedy shortcut too
        sampler.set_row(0, params, seed, prompt_ids)
        for i in range(max_new_tokens):
            if trace:
                t0 = time.perf_counter()
                if self.is_cuda:
                    torch.cuda.current_stream().synchronize()
                t1 = time.perf_counter()
            host_logits = logits.cpu()
            if trace:
                t2 = time.perf_counter()
            token = draw(host_logits, sampler)
            sampler.record(token)
            if trace:
                t3 = time.perf_counter()
                trace.add("wait", t1 - t0)
                trace.add("copy", t2 - t1)
                trace.add("sampling", t3 - t2)
            yield int(token[0])
            if i + 1 == max_new_tokens:
                return
            if trace:
                t0 = time.perf_counter()
            self.bufs.tokens.copy_(token)
            if trace:
                t1 = time.perf_counter()
                trace.step_begin()
            if graph is not None:
                graph.replay()
                logits = self.bufs.logits
            else:
                logits = self._step(self.bufs)
                self.bufs.positions.add_(1)
            if trace:
                trace.step_end()
                trace.add("copy", t1 - t0)
                trace.add("launch", time.perf_counter() - t1)

    def _decode_run_ahead(self, logits, params, seed, prompt_ids, max_new_tokens) -> Iterator[int]:
        """Graph modes with sampling on the device. Chunk 0 is the token sampled from the prompt's logits;
        chunk j >= 1 holds the n tokens of replay j. At iteration k the host queues replay k+1, then waits for
        chunk k, so the GPU always has a step queued while the host handles the previous token."""
        graph = self.graph_for(self.mode, greedy=params.is_greedy)
        sampler, trace = self.device_sampler, self.tracer
        n = graph.steps_per_graph
        sampler.set_row(0, params, seed, prompt_ids)
        first = sampler_for(params.is_greedy)(logits, sampler)  # [1]: the prompt's next token, on the device
        sampler.record(first)
        # Views made once per request, so the per-token loop creates no tensors: slot s of pinned memory, and
        # the replay's sampled tokens (batch row 0).
        first_slot, slots = self._pinned[0, :1], [self._pinned[s, :n] for s in range(PINNED_SLOTS)]
        replay_tokens = graph.out_tokens[:, 0]
        self.bufs.tokens.copy_(first)
        first_slot.copy_(first, non_blocking=True)
        self._copied[0].record()
        produced, replays, remaining = 1, 0, max_new_tokens
        for chunk in itertools.count():
            if produced < max_new_tokens:
                replays += 1
                slot = replays % PINNED_SLOTS
                if trace:
                    t0 = time.perf_counter()
                    trace.step_begin()
                graph.replay()
                if trace:
                    trace.step_end()
                    t1 = time.perf_counter()
                slots[slot].copy_(replay_tokens, non_blocking=True)
                self._copied[slot].record()
                if trace:
                    trace.add("launch", t1 - t0)
                    trace.add("copy", time.perf_counter() - t1)
                produced += n
            slot = chunk % PINNED_SLOTS
            if trace:
                t0 = time.perf_counter()
            self._copied[slot].synchronize()  # waits for chunk k only; replay k+1 is already queued
            if trace:
                trace.add("wait", time.perf_counter() - t0)
            for token in (first_slot if chunk == 0 else slots[slot]).tolist():
                yield token
                remaining -= 1
                if remaining == 0:
                    return

    def measure_step_gpu_ms(self, mode: str, positions: int, replays: int = 50, greedy: bool = False) -> float:
        """GPU time of one decode step of `mode`'s kernels, replayed back to back with no host work between
        (so it is the GPU's own cost, the floor of the token time), at context length `positions`; `greedy`
        times the variant that all-greedy requests replay."""
        decode_mode = DecodeMode.parse(mode)
        if not decode_mode.use_graph:  # eager runs the kernels of the host-sampling graph, launched one by one
            decode_mode = DecodeMode.parse("graph-host-sampling")
        graph = self.graph_for(decode_mode, greedy=greedy)
        with self.sequence(positions + replays * graph.steps_per_graph + 1):
            self.bufs.positions.fill_(positions)
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / (replays * graph.steps_per_graph)

    def close(self) -> None:
        self._graphs.clear()
        self.prefill_graphs = None
        self.weights = self.cache = self.bufs = self.prefiller = None
        if self.is_cuda:
            torch.cuda.empty_cache()


def _tuning_cache_path(device: torch.device, folder: str = "prefill-tuning") -> Path:
    """One tuning file (prefill methods, or decode GEMV shapes with folder "gemv-tuning") per GPU model and
    software versions (a new torch, Triton or CUDA measures again), under the user's replayllm cache folder."""
    import triton

    name = torch.cuda.get_device_name(device)
    key = f"{name}-torch{torch.__version__}-triton{triton.__version__}-cuda{torch.version.cuda}"
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in key)
    return cache_dir() / folder / f"{safe}.json"


def memory_left_bytes(device: torch.device) -> int:
    """What this process can still allocate on `device`: the driver's free memory, or less where a per-process
    cap (torch.cuda.set_per_process_memory_fraction) leaves less above what torch has reserved."""
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda": the current one
    free, total = torch.cuda.mem_get_info(index)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # not in every torch
    fraction = get_fraction(index) if get_fraction is not None else 1.0
    return min(free, int(fraction * total) - torch.cuda.memory_reserved(index))


def fitting_prefill_chunk(peak_bytes: Callable[[int], int], bytes_left: int) -> int:
    """PREFILL_CHUNK_TOKENS if peak_bytes(PREFILL_CHUNK_TOKENS) <= bytes_left, else the largest power of two below
    it whose peak fits, MIN_AUTO_PREFILL_CHUNK when none does. `peak_bytes(chunk_tokens)` is a pass's peak."""
    chunk = PREFILL_CHUNK_TOKENS
    while chunk > MIN_AUTO_PREFILL_CHUNK and peak_bytes(chunk) > bytes_left:
        chunk //= 2
    return chunk


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
