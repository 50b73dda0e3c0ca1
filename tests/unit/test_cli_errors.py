"""Every user mistake is one line and exit 2 (config, YAML, override, input and query files),
a failed run is a non-zero exit, and nothing starts Ray before the cheap checks pass."""

from __future__ import annotations

import json
import socket

import pytest

from l2vg_ray.cli import main


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr("l2vg_ray.ray_utils.init_ray", refuse)


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("content,needle", [
    (b"train:\n  lr: [1,\n", "is not valid YAML"),
    (b"- a\n- b\n", "its top level is a list"),
    (b"name: caf\xe9\n", "is not UTF-8"),
])
def test_a_broken_config_file_is_one_line_naming_the_file(tmp_path, capsys, no_ray, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert main(["run", "--dry-run", "-c", str(path)]) == 2
    _one_line_error(capsys, needle, "bad.yaml")


def test_a_folder_as_config_and_a_malformed_override(tmp_path, capsys, no_ray):
    assert main(["run", "--dry-run", "-c", str(tmp_path)]) == 2
    _one_line_error(capsys, "is a folder")
    assert main(["run", "--dry-run", "train.lr=[1,"]) == 2
    _one_line_error(capsys, "Override 'train.lr=[1,' is malformed")


def test_verbose_shows_the_traceback(tmp_path, capsys, no_ray):
    (tmp_path / "bad.yaml").write_text("- a\n")
    assert main(["-v", "run", "--dry-run", "-c", str(tmp_path / "bad.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_input_file_error_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("l2vg_ray.ray_utils.init_ray", lambda *a, **k: None)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": null}\n')
    assert main(["embed", "model=teacher", f"input={corpus}", f"out={tmp_path / 'e'}"]) == 2
    _one_line_error(capsys, "input error", "c.jsonl line 2 has text=None")


def test_a_missing_model_path_fails_before_ray(capsys, no_ray):
    assert main(["eval", "model=/nope/encoder"]) == 2
    _one_line_error(capsys, "eval.model='/nope/encoder' does not exist")


def test_eval_with_failed_tasks_exits_non_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("l2vg_ray.ray_utils.init_ray", lambda *a, **k: None)

    def all_failed(cfg):
        return {"n_tasks": 2, "n_ok": 0, "n_failed": 2, "failed": {"A": "boom", "B": "boom"}}

    monkeypatch.setattr("l2vg_ray.eval.runner.run_eval", all_failed)
    assert main(["eval", "model=teacher", f"output_dir={tmp_path}"]) == 1
    assert "2 of 2 tasks failed (A, B)" in capsys.readouterr().err

    monkeypatch.setattr("l2vg_ray.eval.runner.run_eval",
                        lambda cfg: {"n_tasks": 2, "n_ok": 2, "n_failed": 0, "failed": {}})
    assert main(["eval", "model=teacher", f"output_dir={tmp_path}"]) == 0


def test_serve_on_a_taken_port_is_one_line_before_ray(capsys, no_ray):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "model=teacher", "host=127.0.0.1", f"port={port}"]) == 2
    _one_line_error(capsys, f"serve.port={port}", "not free", "serve.port=0")


def test_decode_texts_after_dashdash_and_empty_texts(tmp_path, capsys, monkeypatch):
    class Echo:
        def decode(self, texts, max_new_tokens):
            return [t.upper() for t in texts]

    monkeypatch.setattr("l2vg_ray.loading.load_encoder", lambda spec, cfg: Echo())
    assert main(["decode", "model=teacher", "--text", "a=b", "--", "E=mc2", "x"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["text"] for o in out] == ["a=b", "E=mc2", "x"]
    assert main(["decode", "model=teacher", ""]) == 2
    _one_line_error(capsys, "text 1 is empty")
    assert main(["eval", "model=teacher", "--", "E=mc2"]) == 2
    _one_line_error(capsys, "takes no texts")


def test_non_string_queries_and_limit_zero(tmp_path):
    from l2vg_ray.config import ConfigError, InputError, load_config
    from l2vg_ray.generate.queries import clean_queries, load_queries, read_query_file

    path = tmp_path / "q.jsonl"
    path.write_text('{"query": "fine"}\n{"query": ["a", "list"]}\n')
    with pytest.raises(InputError, match=r"q.jsonl:2: query is a list"):
        read_query_file(path)
    path.write_text('{"query": true}\n')
    with pytest.raises(InputError, match=r"q.jsonl:1: query is a bool"):
        read_query_file(path)
    with pytest.raises(ConfigError, match="generate.queries.limit=0 keeps no queries"):
        clean_queries(["a", "b"], limit=0)
    path.write_text('{"query": "a"\n')  # a malformed line: one InputError with file and line
    cfg = load_config(None, [f"cache_dir={tmp_path}", "generate.queries.source=file",
                             f"generate.queries.path={path}"])
    with pytest.raises(InputError, match=r"q.jsonl:1: malformed JSON"):
        load_queries(cfg)


def test_an_unreadable_encoder_folder_fails_before_ray_not_in_every_replica(tmp_path, capsys, no_ray):
    folder = tmp_path / "enc"
    folder.mkdir()
    (folder / "l2vg_config.json").write_text("{not json")
    assert main(["serve", f"model={folder}", "port=0"]) == 2
    _one_line_error(capsys, "is not a readable trained encoder folder")
    assert main(["serve", "model=/nope/encoder", "port=0"]) == 2
    _one_line_error(capsys, "serve.model='/nope/encoder' does not exist")
