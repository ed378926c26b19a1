"""Every bad input of ``lowcost finetune`` / ``lowcost demo`` gives one clear line on stderr and a non-zero
exit, never a traceback, and the ones about the output directory come before any expensive work."""
from __future__ import annotations

import json
import shutil

import pytest

from cli_helpers import run_cli

FAST = ["--seq-len", "32", "--batch", "2", "--steps", "1"]


def _error_line(err: str, command: str = "finetune") -> str:
    """The single error line (transformers' own progress bars may precede it on stderr)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"lowcost {command}: error")]
    assert len(lines) == 1, err
    assert len(lines[0]) < 600
    return lines[0]


def _main(capsys, *args) -> tuple[int, str, str]:
    from lowcost.cli import main
    try:
        code = main([*map(str, args)])
    except SystemExit as exc:            # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def base(tiny_model, text_file, tmp_path):
    return ["finetune", "--model", tiny_model, "--data", text_file, "--out", tmp_path / "out", *FAST]


def _with(args: list, **changes) -> list:
    args = list(args)
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


CASES = [  # (option changes, expected text in the error line)
    ({"model": "/nonexistent/model-dir"}, "does not exist"),
    ({"model": "HuggingFaceTB/SmolLM2-135M"}, "never downloads"),
    ({"data": "/nonexistent/data.txt"}, "no such file"),
    ({"seq_len": "200"}, "--seq-len 200: beyond the model's 96 positions"),
    ({"checkpoint": "selctive"}, "--checkpoint 'selctive': unknown policy"),
    ({"budget": "6 gigs"}, "--budget '6 gigs'"),
    ({"targets": "q_projection"}, "--targets 'q_projection'"),
    ({"targets": "nothing_like_this.*"}, "matches no"),
    ({"device": "cuda:0"}, "--device cuda:0"),
    ({"device": "tpu"}, "--device 'tpu'"),
    ({"backend": "cuda", "device": "cpu"}, "--backend cuda"),
    ({"steps": "-1"}, "--steps must be >= 0"),
    ({"lora_r": "0"}, "--lora-r must be > 0"),
    ({"dropout": "1.5"}, "dropout must be a probability"),
    ({"eval_fraction": "1"}, "--eval-fraction must be in [0, 1)"),
    ({"new_tokens": "/nonexistent/words.txt"}, "--new-tokens /nonexistent/words.txt: no such file"),
]


@pytest.mark.parametrize("changes,expected", CASES, ids=[next(iter(c)) + "=" + str(next(iter(c.values())))
                                                         for c, _ in CASES])
def test_bad_option_is_one_line(capsys, base, changes, expected):
    import torch
    if changes.get("device") == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda:0 is valid here")
    code, _, err = _main(capsys, *_with(base, **changes))
    assert code != 0
    assert expected in _error_line(err), err


def test_data_file_of_unknown_kind(capsys, base, tmp_path):
    data = tmp_path / "table.csv"
    data.write_text("a,b\n")
    code, _, err = _main(capsys, *_with(base, data=data))
    assert code != 0 and "expected a .txt/.text/.md text file or a .jsonl file" in _error_line(err)


def test_empty_data_file(capsys, base, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    code, _, err = _main(capsys, *_with(base, data=data))
    assert code != 0 and "no usable records" in _error_line(err)


BAD_LINES = ['{"text": "first good line of text, long enough to train on."}',
             '{"text": "second good line, also plain text for the model."}',
             '{"text": "broken line with no closing brace"',
             '["not", "an", "object"]',
             '{"text": "third good line of text."}',
             '{"prompt": "a chat record in a text file", "response": "mixed kinds"}',
             '{"title": "no known key"}',
             '{"text": "fourth good line of the file."}']


def test_malformed_jsonl_names_file_and_line(capsys, base, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(BAD_LINES) + "\n")
    code, _, err = _main(capsys, *_with(base, data=data))
    line = _error_line(err)
    assert code != 0 and f"{data}:3:" in line and "--skip-bad-lines" in line


def test_skip_bad_lines_counts_them(capsys, base, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(BAD_LINES) + "\n")
    code, out, err = _main(capsys, *_with(base, data=data), "--skip-bad-lines")
    assert code == 0, err
    assert f"skipped 4 bad line(s) of {data} (first: {data}:3:" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["data_stats"]["skipped_lines"] == 4 and metrics["data_stats"]["records"] == 4


@pytest.mark.parametrize("record,expected", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "'messages' must be"),
    ({"prompt": "only a prompt"}, "needs string 'prompt' and 'response'"),
    ({"text": 42}, "'text' must be a string"),
])
def test_bad_record_shapes(capsys, base, tmp_path, record, expected):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(record) + "\n")
    code, _, err = _main(capsys, *_with(base, data=data))
    line = _error_line(err)
    assert code != 0 and f"{data}:1:" in line and expected in line


def test_chat_needs_a_chat_template(capsys, base, tiny_model, jsonl_files, tmp_path):
    plain = tmp_path / "no_template"
    shutil.copytree(tiny_model, plain)
    for name in ("chat_template.jinja",):
        (plain / name).unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = _main(capsys, *_with(base, model=plain, data=jsonl_files["chat"]))
    assert code != 0 and "need a tokenizer with a chat template" in _error_line(err)


def test_out_holding_another_run_is_refused_before_anything_else(capsys, base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}")
    code, _, err = _main(capsys, *_with(base, model="/nonexistent/model"))   # the model error would come later
    line = _error_line(err)
    assert code != 0 and "already holds a run" in line and "--resume" in line and "--overwrite" in line


def test_out_that_is_a_file(capsys, base, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    code, _, err = _main(capsys, *_with(base, out=target, model="/nonexistent/model"))
    assert code != 0 and "exists and is not a directory" in _error_line(err)


def test_out_that_cannot_be_created(capsys, base, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = _main(capsys, *_with(base, out=blocker / "sub", model="/nonexistent/model"))
    assert code != 0 and "not writable" in _error_line(err)


def test_resume_without_a_run(capsys, base):
    code, _, err = _main(capsys, *base, "--resume")
    assert code != 0 and "holds no run to resume" in _error_line(err)


def test_resume_and_overwrite_together(capsys, base):
    code, _, err = _main(capsys, *base, "--resume", "--overwrite")
    assert code != 0 and "exclude each other" in _error_line(err)


def test_resume_with_changed_options(capsys, base, tmp_path):
    assert _main(capsys, *base)[0] == 0
    code, _, err = _main(capsys, *_with(base, lr="0.1"), "--resume")
    assert code != 0 and "options differ" in _error_line(err) and "--lr" in _error_line(err)


@pytest.mark.parametrize("args,expected", [
    (["--steps", "abc"], "invalid int value: 'abc'"),
    (["--steps", "2", "--epochs", "1"], "not allowed with argument"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_usage_errors_are_one_line(capsys, base, args, expected):
    code, _, err = _main(capsys, *base, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expected in err and "--help" in err


def test_missing_required_option(capsys):
    code, _, err = _main(capsys, "finetune", "--data", "x.txt")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--model" in err


def test_truncated_gguf_names_the_file(tmp_path):
    """Through a real subprocess: what a user's shell shows."""
    data = tmp_path / "d.txt"
    data.write_text("some text " * 50)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)       # header cut short
    result = run_cli("finetune", "--model", gguf, "--data", data, "--out", tmp_path / "out",
                     env={"LOWCOST_CACHE": str(tmp_path / "cache")})
    assert result.returncode != 0
    line = _error_line(result.stderr)
    assert str(gguf) in line and "truncated, corrupt or unsupported GGUF" in line
