import http.server
import re
import shlex
import threading

import pytest
import ray

from audiodiff import __version__, cli, runtime
from audiodiff.cli import main


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code


def test_version(capsys):
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out == f"audiodiff {__version__}\n"


@pytest.mark.parametrize("stage", cli.STAGES)
def test_every_subcommand_help_ends_with_examples_that_parse(stage, capsys):
    assert exit_code([stage, "--help"]) == 0
    examples = re.search(r"\nexamples?:\n((?:  audiodiff .+\n)+)$", capsys.readouterr().out)
    assert examples, f"`audiodiff {stage} --help` ends with no example (see cli.py: epilog=\"example:\\n  ...\")"
    for example in examples[1].splitlines():
        argv = shlex.split(example)[1:]
        assert argv[0] == stage and cli.build_parser().parse_args(argv).stage == stage, example


def test_each_flags_help_states_the_default_of_its_config_field_and_the_samplers_of_sampling(capsys):
    from audiodiff import sampling
    from audiodiff.remix import RemixConfig
    from audiodiff.train import TrainConfig

    assert exit_code(["finetune", "--help"]) == 0
    finetune = " ".join(capsys.readouterr().out.split())
    assert f"peak learning rate (default: {TrainConfig.lr:g})" in finetune
    assert f"denoising steps of the samples (default: {TrainConfig.sample_steps})" in finetune
    assert exit_code(["remix", "--help"]) == 0
    remix = re.sub(r"(?<=\w)- (?=\w)", "-", " ".join(capsys.readouterr().out.split()))  # argparse wraps at hyphens
    assert f"{', '.join(sampling.SAMPLERS)} (default: {RemixConfig.scheduler})" in remix
    assert f"{sampling.SAMPLERS['unipc'].default_steps} for unipc" in remix


def test_the_command_parses_without_importing_torch_or_ray():
    import subprocess
    import sys

    code = "import sys; from audiodiff.cli import build_parser; build_parser(); print(sorted({'torch', 'ray'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.parametrize("argv", [[], ["generate"], ["generate", "--model", "tiny", "--output", "x", "--steps", "many"],
                                  ["no-such-stage"]])
def test_usage_errors_exit_2_with_the_usage(argv, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: audiodiff") and "Traceback" not in err


def one_line_error(capsys, stage: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"audiodiff {stage}: error: "), err
    return err[0]


def test_an_address_where_no_ray_answers_is_named_in_seconds(free_port, monkeypatch, tmp_path, capsys):
    closed = f"127.0.0.1:{free_port()}"
    assert main(["generate", "--model", "tiny", "--output", str(tmp_path), "--address", closed]) == 1
    assert f"--address {closed}: no Ray cluster answers there" in one_line_error(capsys, "generate")
    monkeypatch.setenv("RAY_ADDRESS", "head:port")
    assert main(["evaluate", "--clips", "a", "--reference", "b"]) == 1
    assert "RAY_ADDRESS=head:port: not HOST:PORT" in one_line_error(capsys, "evaluate")


def test_an_interrupt_ends_with_one_line_and_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.STAGES, "demo", (cli.STAGES["demo"][0], interrupted))
    assert main(["demo"]) == 130
    assert capsys.readouterr().err == "audiodiff demo: interrupted\n"


CLIP = ["--model", "tiny", "--output", "out"]
BAD_VALUES = [
    (["generate", *CLIP, "--steps", "0"], "--steps must be at least 1, got 0"),
    (["generate", *CLIP, "--seconds", "inf"], "--seconds must be a finite number, got inf"),
    (["generate", *CLIP, "--seconds", "nan"], "--seconds must be a finite number, got nan"),
    (["generate", *CLIP, "--seconds", "60", "--overlap", "nan"], "--overlap must be a finite number, got nan"),
    (["generate", *CLIP, "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    (["generate", *CLIP, "--eta", "nan"], "--eta must be a finite number, got nan"),
    (["generate", *CLIP, "--target-dbfs=-inf"], "--target-dbfs must be a finite number, got -inf"),
    (["generate", *CLIP, "--num-clips", "0"], "nothing to generate"),
    (["generate", *CLIP, "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["generate", *CLIP, "--scheduler", "pndm"], "--scheduler must be one of"),
    (["generate", *CLIP, "--genre", "jazz", "--encodings", "e.parquet"], "give --genre or --encodings, not both"),
    (["remix", "a.wav", *CLIP, "--keep-start", "nan"], "--keep-start must be a finite number, got nan"),
    (["remix", "a.wav", *CLIP, "--strength", "1.5"], "--strength must lie in [0, 1]"),
    (["remix", "a.wav", *CLIP, "--variations", "0"], "--variations must be at least 1, got 0"),
    (["continue", "a.wav", *CLIP, "--seconds", "0"], "--seconds must be more than 0, got 0"),
    (["interpolate", "a.wav", "b.wav", *CLIP, "--points", "1"], "--points must be at least 2, got 1"),
    (["interpolate", "a.wav", "b.wav", *CLIP, "--scheduler", "ddpm"], "use --scheduler ddim"),
    (["preprocess", "in", "--output", "out", "--limit", "0"], "--limit must be at least 1, got 0"),
    (["preprocess", "in", "--output", "out", "--max-seconds", "nan"], "--max-seconds must be a finite number"),
    (["preprocess", "in", "--output", "out", "--num-cpus", "0"], "--num-cpus must be at least 1, got 0"),
    (["finetune", "--data", "d", "--model", "tiny", "--output", "o", "--lr", "inf"], "--lr must be a finite number"),
    (["finetune", "--data", "d", "--model", "tiny", "--output", "o", "--epochs", "0"], "--epochs must be at least 1"),
    (["finetune", "--data", "d", "--model", "tiny", "--output", "o", "--label-dropout", "1"], "--label-dropout must"),
    (["finetune", "--data", "d", "--model", "tiny", "--output", "o", "--cpus-per-worker", "nan"], "--cpus-per-worker"),
    (["demo", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["demo", "--output", "s3://bucket/demo"], "the demo writes to a local folder"),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES)
def test_values_no_stage_takes_end_in_one_line_before_any_ray_starts(argv, message, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(runtime, "init_ray", lambda *args: started.append(args))
    ray_before = ray.is_initialized()
    assert main(argv) == 1
    assert message in one_line_error(capsys, argv[0])
    assert not started and ray.is_initialized() == ray_before


def user_mistakes(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "model_index.json").write_bytes(b"\x89PNG\xff\xfe")
    missing = str(tmp_path / "missing")
    return [
        (["generate", "--model", str(tmp_path / "notes.txt"), "--output", missing], "notes.txt: not a model folder"),
        (["generate", "--model", str(tmp_path / "broken"), "--output", missing], "model_index.json is not valid JSON"),
        (["generate", "--model", str(tmp_path / "binary"), "--output", missing], "model_index.json is not valid JSON"),
        (["generate", "--model", missing, "--output", str(tmp_path / "out")], f"{missing}: no such model folder"),
        (["generate", "--model", "tiny", "--output", "ftp://host/clips"], "unsupported storage scheme 'ftp://'"),
        (["generate", "--model", "tiny", "--output", str(tmp_path / "notes.txt" / "clips")], "cannot write"),
        (["preprocess", missing, "--output", str(tmp_path / "out")], f"{missing}: source not found"),
        (["finetune", "--data", missing, "--model", "tiny", "--output", str(tmp_path / "out")], missing),
        (["evaluate", "--clips", missing, "--reference", missing], f"--clips {missing}: not found"),
    ]


def test_user_mistakes_end_with_one_line_naming_the_input(local_ray, tmp_path, capsys):
    for argv, named in user_mistakes(tmp_path):
        assert main(argv) == 1, argv
        assert named in one_line_error(capsys, argv[0])


@pytest.fixture
def refusing_s3(monkeypatch):
    """An S3 endpoint on loopback that refuses every request (403), as S3 does with wrong credentials."""
    class Refuse(http.server.BaseHTTPRequestHandler):
        def refuse(self):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = do_PUT = do_POST = refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()


def test_storage_that_refuses_the_credentials_says_which_to_check(local_ray, refusing_s3, capsys):
    assert main(["evaluate", "--clips", "s3://bucket/clips", "--reference", "s3://bucket/audio"]) == 1
    line = one_line_error(capsys, "evaluate")
    assert "s3://bucket/clips" in line and "check the credentials" in line and "AWS_ACCESS_KEY_ID" in line


def test_damaged_files_end_in_one_line_naming_them(tmp_path, monkeypatch):
    from audiodiff import clips, dataset, model_files, preprocess, sources, train, train_checkpoint
    from audiodiff.errors import AudiodiffError
    from audiodiff.generate import GenerateConfig

    def refused(call, *named):
        with pytest.raises(AudiodiffError) as raised:
            call()
        message = str(raised.value)
        assert "\n" not in message and all(n in message for n in named), message

    not_parquet = tmp_path / "tracks" / "train.parquet"
    not_parquet.parent.mkdir()
    not_parquet.write_text("a text file named .parquet")
    refused(lambda: sources.open_source(str(not_parquet.parent), sources.TrackSettings()), str(not_parquet), "as parquet")

    latin1 = tmp_path / "mel_config.json"
    latin1.write_bytes('{"x_res": 64, "note": "café"}'.encode("latin-1"))
    config = preprocess.PreprocessConfig(sources=["in"], output="out", mel_config=str(latin1))
    refused(lambda: preprocess.resolve_mel_config(config), str(latin1), "not a UTF-8 text file")
    (tmp_path / "model" / "mel").mkdir(parents=True)
    (tmp_path / "model" / "mel" / "mel_config.json").write_bytes(latin1.read_bytes())
    refused(lambda: model_files.load_mel_config(str(tmp_path / "model")), "mel_config.json", "not a UTF-8 text file")

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train"')
    refused(lambda: dataset.saved_dataset_files(str(saved)), "dataset_dict.json: not valid JSON", "save the dataset again")
    (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (saved / "train").mkdir()
    (saved / "train" / "state.json").write_bytes(b"\xff\xfe\x00")
    refused(lambda: dataset.saved_dataset_files(str(saved)), "state.json: not valid JSON")
    (saved / "train" / "state.json").write_text("[]")
    refused(lambda: dataset.saved_dataset_files(str(saved)), "state.json: expected a JSON object")

    checkpoint = tmp_path / "run" / "checkpoints" / train_checkpoint.RUN_NAME / "checkpoint_0"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"step": 5, "config": {')
    resumed = train.TrainConfig(data="d", model="tiny", output=str(tmp_path / "run"), resume=True)
    refused(lambda: train_checkpoint.check_resume(resumed), str(checkpoint / "state.json"), "remove that checkpoint")

    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "generation.json").write_text('{"model": "tiny",')
    monkeypatch.setattr(clips, "check_paths_reachable", lambda *args: None)  # the cluster's part
    generated = GenerateConfig(model="tiny", output=str(tmp_path / "clips"))
    # a damaged generation.json is not one audiodiff wrote (audiodiff.ownership): refused, naming it
    refused(lambda: clips.check_output(generated, "generate"), "generation.json", "choose a new or empty --output")
