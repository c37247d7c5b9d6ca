"""`LLM`: the public entry point. Loads a GGUF model on a device and generates text."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator, Sequence

import torch

from ..default_model import default_model_path
from ..errors import InvalidParameterError, PromptTooLongError, ReplayLLMError
from ..sampling import SamplingParams
from .backend import Backend
from .decode_mode import DecodeMode
from .model_file import ModelFile, open_model_file
from .outputs import GenerationOutput
from .stop_strings import StopStringFilter

Prompt = str | Sequence[int]
DEVICES = ("auto", "cpu", "cuda")
KV_CACHE_TYPES = ("f16", "int8", "q4")  # kernels/kv_cache.KV_CACHE_DTYPES' names (not imported here: it loads Triton)
DEFAULT_MAX_CONTEXT_TOKENS = 4096
# Prompt tokens per prefill pass: at least the smallest tuning bucket (and a tensor-core tile); at most what
# keeps a pass's activations of a large model near a GiB.
MIN_PREFILL_CHUNK, MAX_PREFILL_CHUNK = 16, 8192


class LLM:
    """A GGUF model loaded on a device.

    `model`: path of a .gguf file; None means the default model (SmolLM2-135M-Instruct, fetched once).
    `device`: "cpu" (the plain-torch reference), "cuda" (CUDA-graph decode), or "auto" (cuda when usable).
    `max_context`: tokens of context (prompt + generated) per sequence; default min(model's, 4096).
    `mode`: GPU decode mode, "graph" (replayed CUDA graph, sampling on the GPU) or "eager" (every kernel
    launched each token, logits sampled on the host: the baseline the graph mode is measured against);
    also "graph-host-sampling" and "graph-Nstep" (N steps per graph), see engine/decode_mode.py.
    `int8_activations` (GPU, off by default): matrices of the types quant_matvec_q8 supports multiply
    int8-quantized activations at decode: about twice the decode speed, at the price of a rounding error that
    changes greedy tokens after some dozens (see README). `pdl` (GPU): launch the decode step's kernels with
    programmatic dependent launch (kernels/pdl.py); None (default) turns it on where the GPU has it (compute
    capability 9.0+); the tokens are the same either way. `activations` (GPU): how the quantized matrices'
    decode GEMVs take their inputs, "16bit" (default where the model's widths are multiples of 32; rounding
    below f16's), "int8" (what `int8_activations=True` picks) or "f32"; None: the default.
    `prefill_chunk` (GPU): prompt tokens per prefill pass, a power of two from 16 to 8192; longer prompts are
    prefilled chunk by chunk, so it bounds prefill's activation memory. None (default): 2048, or less where the
    GPU memory left after loading would not hold a pass of 2048 (said on stderr with `progress`).
    `prefill_graphs` (GPU): capture the prefill passes as CUDA graphs at load (one per bucket of chunk sizes),
    so that a prompt chunk is one replay instead of a thousand launches from Python; None (default) turns
    it on wherever the device is CUDA, False prefills launch by launch (the same kernels; a chunk padded to its
    bucket may take another GEMM method, so logits agree to the GEMMs' rounding).
    `kv_cache`: the KV cache's element type, "f16" (default), "int8" (one scale per token and kv head, about
    half the bytes: faster decode deep in a context, at a rounding of keys and values) or "q4" (4 bits with a
    scale per 32 dims, under a third of f16's bytes, at a coarser rounding; head_dim a multiple of 64);
    kernels/kv_cache.py. On the CPU, "int8" or "q4" makes the reference round keys and values the same way: that
    cache's oracle.
    """

    def __init__(self, model: str | os.PathLike | None = None, device: str = "auto", *,
                 max_context: int | None = None, mode: str = "graph", progress: bool = True,
                 int8_activations: bool = False, pdl: bool | None = None, prefill_chunk: int | None = None,
                 activations: str | None = None, prefill_graphs: bool | None = None, kv_cache: str = "f16"):
        if device not in DEVICES:
            raise InvalidParameterError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        DecodeMode.parse(mode)  # an unknown mode fails before anything loads
        if kv_cache not in KV_CACHE_TYPES:
            raise InvalidParameterError(f"kv_cache must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache!r}")
        self.kv_cache = kv_cache
        check_prefill_chunk(prefill_chunk)
        path = default_model_path(progress=progress) if model is None else model
        self._model_file: ModelFile = open_model_file(path)
        self.config = self._model_file.config
        self.tokenizer = self._model_file.tokenizer
        self.max_context_tokens = _resolve_max_context(max_context, self.config.max_context_tokens)
        self.device = _resolve_device(device)
        for name, value, optional in (("int8_activations", int8_activations, False), ("pdl", pdl, True),
                                      ("prefill_graphs", prefill_graphs, True)):  # optional: None is the default
            if not isinstance(value, bool) and not (optional and value is None):
                raise InvalidParameterError(f"{name} must be True or False, got {value!r}")
            if value and self.device != "cuda":
                raise InvalidParameterError(f"{name} is a GPU option (decode or prefill); use device='cuda'")
        if activations is not None:
            from ..runner.decode_step import check_activation_form  # here: importing the GPU runner loads Triton

            check_activation_form(activations)
            if self.device != "cuda":
                raise InvalidParameterError("activations is a GPU decode option; use device='cuda'")
            if int8_activations and activations != "int8":
                raise InvalidParameterError(f"int8_activations=True contradicts activations={activations!r}")
        self.backend = self._make_backend(mode, progress, int8_activations, pdl, prefill_chunk, activations,
                                          prefill_graphs is not False)
        self.last_output: GenerationOutput | None = None

    def _make_backend(self, mode: str, progress: bool, int8_activations: bool, pdl: bool | None,
                      prefill_chunk: int | None, activations: str | None, prefill_graphs: bool = True) -> Backend:
        if self.device == "cpu":  # the reference has no prefill activations to bound: it ignores prefill_chunk
            from .reference_backend import ReferenceBackend

            return ReferenceBackend(self._model_file, self.max_context_tokens, progress=progress,
                                    kv_cache=self.kv_cache)
        from .gpu_backend import GPUBackend

        return GPUBackend(self._model_file, self.max_context_tokens, mode=mode, progress=progress,
                          int8_activations=int8_activations, pdl=pdl, prefill_chunk=prefill_chunk,
                          activations=activations, prefill_graphs=prefill_graphs, kv_cache=self.kv_cache)

    @property
    def model_file(self) -> ModelFile:
        return self._model_file

    # ---- public API -------------------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | None = None) -> list[GenerationOutput]:
        """Generate for each prompt (a string, or a list of token ids); returns one output per prompt."""
        params = params or SamplingParams()
        outputs = []
        for prompt in _as_prompt_list(prompts):
            output = GenerationOutput(prompt_token_ids=self._prompt_ids(prompt))
            for _ in self._run(output, params):
                pass
            outputs.append(output)
        return outputs

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece (never half a UTF-8 character, never part of a stop string)."""
        output = GenerationOutput(prompt_token_ids=self._prompt_ids(prompt))
        self.last_output = output  # lets a caller read token ids and finish reason after streaming
        yield from self._run(output, params or SamplingParams())

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template, ready for the assistant's turn."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_id
        if len(ids) >= 2 and ids[0] == ids[1] == bos:  # the template wrote BOS and so did encode()
            ids = ids[1:]
        return ids

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Float32 logits [len(token_ids), vocab], one row per position, from an empty context."""
        ids = self._prompt_ids(list(token_ids))
        return self.backend.logits(ids)

    def close(self) -> None:
        self.backend.close()
        self._model_file.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals --------------------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InvalidParameterError(
                    f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if not ids:
            raise InvalidParameterError("the prompt is empty (and the model adds no BOS token)")
        if len(ids) >= self.max_context_tokens:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_context_tokens} "
                f"(prompt plus at least one generated token); shorten the prompt or raise max_context "
                f"(--ctx; the model allows {self.config.max_context_tokens})")
        return ids

    def _run(self, output: GenerationOutput, params: SamplingParams) -> Iterator[str]:
        prompt_ids = output.prompt_token_ids
        room = self.max_context_tokens - len(prompt_ids)
        max_new_tokens = min(params.max_tokens, room)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        stop_ids = frozenset() if params.ignore_eos else self.tokenizer.stop_ids
        decoder = self.tokenizer.stream_decoder()
        stops = StopStringFilter(params.stop)
        pieces: list[str] = []
        hit_stop_token = False
        ids = self.backend.generate_ids(prompt_ids, params, seed, max_new_tokens)
        trace = getattr(self.backend, "tracer", None)  # set only while profiling
        try:
            for token in ids:
                if trace:
                    started = time.perf_counter()
                if token in stop_ids:
                    hit_stop_token = True
                    break
                output.token_ids.append(token)
                piece = stops.push(decoder.push(token))
                if trace:
                    trace.add("detokenize", time.perf_counter() - started)
                    trace.end_token()
                if piece:
                    pieces.append(piece)
                    yield piece
                if stops.stopped:
                    break
        finally:
            ids.close()  # a run-ahead backend stops here
        if not stops.stopped:
            tail = stops.push(decoder.flush())
            if not stops.stopped:
                tail += stops.flush()
            if tail:
                pieces.append(tail)
                yield tail
        output.finish_reason = "stop" if hit_stop_token or stops.stopped else "length"
        output.text = "".join(pieces)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    for p in prompts:
        if not isinstance(p, str) and not (isinstance(p, Sequence) and all(isinstance(t, int) for t in p)):
            raise InvalidParameterError("each prompt must be a string or a list of token ids")
    return prompts


def _resolve_max_context(requested: int | None, model_max: int) -> int:
    if requested is None:
        return min(model_max, DEFAULT_MAX_CONTEXT_TOKENS)
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 2:
        raise InvalidParameterError(f"max_context must be an integer >= 2, got {requested!r}")
    if requested > model_max:
        raise InvalidParameterError(
            f"max_context {requested} exceeds the model's context length {model_max}")
    return requested


def check_prefill_chunk(tokens: int | None) -> None:
    """InvalidParameterError unless `tokens` is None (chosen at load) or a power of two in the allowed range."""
    if tokens is None:
        return
    if (isinstance(tokens, bool) or not isinstance(tokens, int) or not MIN_PREFILL_CHUNK <= tokens <= MAX_PREFILL_CHUNK
            or tokens & (tokens - 1)):
        raise InvalidParameterError(f"prefill_chunk must be a power of two from {MIN_PREFILL_CHUNK} to "
                                    f"{MAX_PREFILL_CHUNK} (tokens per prefill pass), got {tokens!r}")


def _resolve_device(device: str) -> str:
    usable = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    if device == "auto":
        return "cuda" if usable else "cpu"
    if device == "cuda" and not usable:
        reason = ("no CUDA device is visible to PyTorch" if not torch.cuda.is_available()
                  else "the GPU's compute capability is below 8.0")
        raise ReplayLLMError(f"device 'cuda' was asked for but {reason}; use --device cpu")
    return device
