"""The command line: outputs, and the one-line `error: ...` / exit 2 contract for user errors."""

from __future__ import annotations

import json

import pytest

from replayllm.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_generate_streams_the_continuation(capsys, tiny_model_path):
    code, out, err = run(capsys, "generate", "hello", "--model", str(tiny_model_path), "--device", "cpu",
                         "--max-tokens", "5", "--temperature", "0", "--quiet")
    assert code == 0 and out.startswith("hello") and len(out) > len("hello")


def test_tokenize_prints_a_json_list_of_ids(capsys, tiny_model_path):
    from replayllm.engine.model_file import open_model_file

    code, out, _ = run(capsys, "tokenize", "--model", str(tiny_model_path), "hello world")
    expected = open_model_file(tiny_model_path).tokenizer.encode("hello world")
    assert code == 0 and json.loads(out) == expected


def test_info_lists_types_and_parameters(capsys, tiny_model_path):
    code, out, _ = run(capsys, "info", str(tiny_model_path))
    assert code == 0
    assert "general.architecture = 'llama'" in out and "Q8_0" in out and "parameters:" in out


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "x", "--temperature", "-1"], "temperature"),
    (["generate", "x", "--top-p", "0"], "top_p"),
    (["generate", "x", "--max-tokens", "abc"], "--max-tokens"),
    (["generate", "x", "--device", "tpu"], "--device"),
    (["bench", "m.gguf", "-r", "0"], "-r"),
    (["profile", "m.gguf", "--modes", "warp"], "warp"),
    (["generate", "x", "--prefill-chunk", "abc"], "--prefill-chunk"),
    (["generate", "x", "--prefill-chunk", "100"], "prefill_chunk must be a power of two from 16 to 8192"),
    (["chat", "--prefill-chunk", "8"], "prefill_chunk must be a power of two"),
    (["bench", "m.gguf", "--prefill-chunk", "16384"], "prefill_chunk must be a power of two"),
    (["bench", "m.gguf", "--kernels", "--device", "cpu"], "--kernels records GPU kernels"),
])
def test_bad_parameters_are_one_line_errors(capsys, argv, fragment):
    code, _, err = run_catching_exit(capsys, argv)
    assert_user_error(code, err, fragment)


@pytest.mark.parametrize("flag", ["--pdl", "--int8-activations", "--prefill-graphs"])
def test_gpu_only_options_on_the_cpu_are_one_line_errors(capsys, tiny_model_path, flag):
    code, _, err = run_catching_exit(capsys, ["generate", "x", "--model", str(tiny_model_path), "--device", "cpu",
                                              flag])
    assert_user_error(code, err, "is a GPU option")


def test_pdl_can_be_turned_off_anywhere(capsys, tiny_model_path):
    code, out, _ = run(capsys, "generate", "hello", "--model", str(tiny_model_path), "--device", "cpu",
                       "--no-pdl", "--max-tokens", "2", "--quiet")
    assert code == 0 and out


def test_a_prefill_chunk_is_accepted_on_the_cpu(capsys, tiny_model_path):
    code, out, _ = run(capsys, "generate", "hello", "--model", str(tiny_model_path), "--device", "cpu",
                       "--prefill-chunk", "64", "--max-tokens", "2", "--quiet")
    assert code == 0 and out.startswith("hello")


def test_missing_and_corrupt_files_are_one_line_errors(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "x", "--model", str(tmp_path / "nope.gguf"), "--device", "cpu")
    assert_user_error(code, err, "no such file")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    code, _, err = run(capsys, "generate", "x", "--model", str(bad), "--device", "cpu")
    assert_user_error(code, err, str(bad))
    code, _, err = run(capsys, "info", str(bad))
    assert_user_error(code, err, str(bad))


def test_prompt_longer_than_the_context_is_a_one_line_error(capsys, tiny_model_path):
    code, _, err = run(capsys, "generate", "word " * 40, "--model", str(tiny_model_path), "--device", "cpu",
                       "--ctx", "8", "--quiet")
    assert_user_error(code, err, "context holds 8")


def run_catching_exit(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
