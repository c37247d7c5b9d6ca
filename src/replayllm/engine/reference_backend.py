"""The plain-torch fp32 reference backend: the correctness oracle for every faster path.

It is what `device="cpu"` runs. It can also be placed on a GPU (same code, same fp32 math), which the GPU tests
use to check large synthetic models in seconds instead of minutes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from tqdm import tqdm

from ..errors import InvalidParameterError
from ..gguf import dequantize
from ..models import get_architecture
from ..models.int8_reference import Int8Products, storage_key
from ..sampling import SamplerState, SamplingParams, sampler_for
from .backend import Backend
from .model_file import ModelFile


class ReferenceBackend(Backend):

    def __init__(self, model_file: ModelFile, max_context_tokens: int, progress: bool = True,
                 device: torch.device | str = "cpu", kv_cache: str = "f16"):
        """kv_cache "int8" or "q4": keys and values go through that KV cache's rounding as they are stored (the
        reference of the GPU path with that cache); "f16" (the default): kept in f32, unrounded."""
        self.device = torch.device(device)
        self.name = ("cpu" if self.device.type == "cpu" else f"reference-{self.device.type}") \
            + ("" if kv_cache == "f16" else f"-kv-{kv_cache}")
        self._kv_rounding = None
        if kv_cache != "f16":
            from ..kernels.kv_cache import kv_row_shape, round_trip_kv_reference

            try:
                kv_row_shape(kv_cache, model_file.config.head_dim)
            except ValueError as err:
                raise InvalidParameterError(f"{err} (this model's head_dim); use kv_cache='int8' or 'f16'") from None
            self._kv_rounding = functools.partial(round_trip_kv_reference, dtype=kv_cache)
        self.config = model_file.config
        self.max_context_tokens = max_context_tokens
        gguf_file = model_file.gguf
        self._gguf = gguf_file
        self._names_by_storage: dict[int, str] = {}
        self._int8_weights = None  # packed on first use by int8_reference_logits
        total = sum(gguf_file.tensors[n].nbytes for n in gguf_file.tensors)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
                   leave=False)

        def load_weight(name: str) -> torch.Tensor:
            info = gguf_file.tensors[name]
            weight = None
            if self.device.type != "cpu":
                weight = _dequantize_on_device(info, gguf_file.tensor_data(name), self.device)
            if weight is None:
                weight = torch.from_numpy(dequantize(info, gguf_file.tensor_data(name))).to(self.device)
            bar.update(info.nbytes)
            self._names_by_storage[storage_key(weight)] = name  # for int8_reference_logits
            return weight

        with bar:
            self.model = get_architecture(self.config.architecture).build_reference(self.config, load_weight)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        cache = self.model.new_kv_cache(len(token_ids), self._kv_rounding)
        return self.model(torch.tensor(token_ids, dtype=torch.long, device=self.device), 0, cache).cpu()

    def int8_reference_logits(self, token_ids: list[int], first_row: int = 0) -> torch.Tensor:
        """logits() with the int8 decode path's products from row `first_row` on, for every weight of a type the
        int8 GEMVs take (models/int8_reference.py): the reference that path is checked against. The weights are
        packed again, once, on first use."""
        if self._int8_weights is None:
            self._int8_weights = self._packed_int8_weights()
        mode = Int8Products(self._int8_weights, first_row)
        with mode:
            logits = self.logits(token_ids)
        if first_row < len(token_ids) and self._int8_weights and mode.int8_products == 0:
            raise RuntimeError("int8 reference: no weight product went through the int8 path")
        return logits

    def _packed_int8_weights(self) -> dict:
        from ..kernels.quant_matvec_q8 import SUPPORTED_TYPES
        from ..kernels.quant_weight import pack_weight

        packed = {}
        for key, name in self._names_by_storage.items():
            info = self._gguf.tensors[name]
            if info.ggml_type in SUPPORTED_TYPES and len(info.shape) == 2:
                n_cols, n_rows = info.shape
                raw = self._gguf.tensor_data(name).reshape(n_rows, -1)
                packed[key] = pack_weight(info.ggml_type, raw, n_cols).to(self.device)
        return packed

    @torch.inference_mode()
    def prefill_only(self, token_ids: list[int], chunk_tokens: int) -> None:
        cache = self.model.new_kv_cache(len(token_ids), self._kv_rounding)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        for start in range(0, len(token_ids), chunk_tokens):
            self.model(ids[start:start + chunk_tokens], start, cache)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, seed: int,
                     max_new_tokens: int) -> Iterator[int]:
        cache = self.model.new_kv_cache(len(prompt_ids) + max_new_tokens, self._kv_rounding)
        state = SamplerState.create(1, self.config.vocab_size, self.device)
        state.set_row(0, params, seed, prompt_ids)
        draw = sampler_for(params.is_greedy)  # the same tokens; greedy skips the sort
        logits = self.model(torch.tensor(prompt_ids, dtype=torch.long, device=self.device), 0, cache)[-1:]
        position = len(prompt_ids)
        for i in range(max_new_tokens):
            token = draw(logits, state)  # [1]
            state.record(token)
            yield int(token[0])
            if i + 1 == max_new_tokens:
                return
            logits = self.model(token, position, cache)
            position += 1


def _dequantize_on_device(info, data, device: torch.device) -> torch.Tensor | None:
    """A quantized 2-D weight dequantized on `device` with plain torch ops (`dequantize_reference`, which the
    kernel tests hold bitwise equal to the gguf package's numpy dequantizers): a 7B model's weights in seconds
    instead of minutes of numpy. None for the tensors it does not cover (those go through numpy)."""
    from ..kernels.quant_weight import FLOAT_TYPES, MATVEC_TYPES, dequantize_reference, pack_weight

    if len(info.shape) != 2 or info.ggml_type not in MATVEC_TYPES or info.ggml_type in FLOAT_TYPES:
        return None
    n_cols, n_rows = info.shape
    packed = pack_weight(info.ggml_type, data.reshape(n_rows, -1), n_cols).to(device)
    return dequantize_reference(packed)
