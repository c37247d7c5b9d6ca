"""`replayllm generate` and `replayllm chat`."""

from __future__ import annotations

import argparse
import sys
import time

from ..engine.llm import KV_CACHE_TYPES
from ..errors import InvalidParameterError, PromptTooLongError
from ..sampling import SamplingParams

_SAMPLING_FLAGS = {  # flag -> (SamplingParams field, type, help)
    "--max-tokens": ("max_tokens", int, "tokens to generate at most"),
    "--temperature": ("temperature", float, "0 means greedy"),
    "--top-k": ("top_k", int, "keep the k most likely tokens (0: off)"),
    "--top-p": ("top_p", float, "nucleus sampling threshold (1: off)"),
    "--min-p": ("min_p", float, "drop tokens below min-p times the top probability (0: off)"),
    "--repeat-penalty": ("repetition_penalty", float, "penalise repeats in the last --repeat-last-n tokens"),
    "--repeat-last-n": ("penalty_last_n", int, "penalty window (0: off, -1: whole context)"),
    "--presence-penalty": ("presence_penalty", float, "subtract from seen tokens' logits"),
    "--frequency-penalty": ("frequency_penalty", float, "subtract count x this from seen tokens' logits"),
    "--seed": ("seed", int, "same seed, same text"),
}


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt, streaming the text")
    gen.add_argument("prompt", nargs="?", help="the prompt (read from stdin when omitted)")
    _add_model_options(gen)
    _add_sampling_options(gen)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.set_defaults(run=run_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.add_argument("--system", help="system message")
    chat.set_defaults(run=run_chat)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--mode", default="graph",
                        help="GPU decode mode: graph (default), eager, graph-host-sampling, graph-Nstep")
    parser.add_argument("--ctx", type=int, help="context tokens per sequence (default: min(model, 4096))")
    add_prefill_option(parser)
    add_decode_options(parser)
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or statistics")


def add_prefill_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill-chunk", type=int, metavar="N",
                        help="GPU: prompt tokens per prefill pass, a power of two from 16 to 8192 (default: 2048, or "
                             "less when the GPU memory left after loading would not hold a pass of 2048)")
    parser.add_argument("--prefill-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="GPU: prefill each prompt chunk by one replay of a pass captured at load (default: on; "
                             "the same kernels either way)")


def add_decode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--activations", choices=("16bit", "int8", "f32"),
                        help="GPU: how quantized matrices take their inputs at decode: 16bit (default where the "
                             "model's widths allow; rounding below f16's), int8 (faster; the rounding changes greedy "
                             "tokens after some dozens) or f32")
    parser.add_argument("--int8-activations", action="store_true", help="GPU: the same as --activations int8")
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=None,
                        help="GPU: programmatic dependent launch of the decode kernels (default: on where the GPU "
                             "has it, compute capability 9.0+; same tokens either way)")
    parser.add_argument("--kv-cache", choices=KV_CACHE_TYPES, default="f16",
                        help="the KV cache's element type: f16 (default), int8 (about half the bytes: faster "
                             "decode deep in a long context, at a rounding of keys and values) or q4 (4 bits in "
                             "blocks of 32, under a third of the bytes, at a coarser rounding); on the CPU the "
                             "reference rounds them the same way")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    for flag, (field, kind, help_text) in _SAMPLING_FLAGS.items():
        parser.add_argument(flag, type=kind, dest=field, help=help_text)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    given = {field: getattr(args, field) for field, _, _ in _SAMPLING_FLAGS.values()
             if getattr(args, field) is not None}
    if getattr(args, "stop", None):
        given["stop"] = tuple(args.stop)
    return SamplingParams(**given)


def _load(args: argparse.Namespace):
    from ..engine import LLM

    return LLM(args.model, device=args.device, max_context=args.ctx, mode=args.mode, progress=not args.quiet,
               int8_activations=args.int8_activations, pdl=args.pdl, prefill_chunk=args.prefill_chunk,
               activations=args.activations, prefill_graphs=args.prefill_graphs, kv_cache=args.kv_cache)


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # validate before loading anything
    prompt = args.prompt if args.prompt is not None else _read_stdin_prompt()
    llm = _load(args)
    if args.chat:
        prompt = llm.chat_prompt_ids([{"role": "user", "content": prompt}])
    else:
        sys.stdout.write(prompt)
    _stream(llm, prompt, params, quiet=args.quiet)
    sys.stdout.write("\n")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        try:
            ids = llm.chat_prompt_ids(messages)
            reply = _stream(llm, ids, params, quiet=True)
        except PromptTooLongError as exc:
            messages.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        print()
        messages.append({"role": "assistant", "content": reply})
    return 0


def _stream(llm, prompt, params: SamplingParams, quiet: bool) -> str:
    pieces = []
    start = time.perf_counter()
    for piece in llm.stream(prompt, params):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    if not quiet:
        n_tokens = llm.last_output.token_ids if llm.last_output else []
        print(f"\n[{len(n_tokens)} tokens in {elapsed:.2f} s, {len(n_tokens) / max(elapsed, 1e-9):.1f} tokens/s, "
              f"{llm.device}]", file=sys.stderr, end="")
    return "".join(pieces)


def _read_stdin_prompt() -> str:
    if sys.stdin.isatty():
        raise InvalidParameterError("give a prompt, e.g. replayllm generate \"The capital of France is\"")
    return sys.stdin.read()
