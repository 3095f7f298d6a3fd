"""Issue 14 items 8 and 9: every user error of the ``pyvae`` command line is one line naming
the argument or file, with exit status 2; tracebacks are for bugs only."""
import json

import pytest
import torch

from pyvae.cli import main

TINY = ["--model", "VAE", "--data", "shapes2d", "--data-arg", "size=64", "--batch-size", "16",
        "--model-arg", "latent_dim=2", "--no-progress", "--log-every", "1"]


def run_cli(capsys, argv):
    """(exit status, stderr) of ``pyvae ARGV``, argparse's SystemExit included."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def assert_one_line_error(status, err, *needles):
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvae "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.mark.parametrize("flags, needles", [
    (["--steps", "-5"], ["steps must be >= 1", "-5"]),
    (["--steps", "0"], ["steps"]),
    (["--steps", "3", "--lr", "nan"], ["lr must be positive", "nan"]),
    (["--steps", "3", "--lr", "-1"], ["lr must be positive"]),
    (["--steps", "3", "--batch-size", "0"], ["batch_size"]),
    (["--steps", "3", "--eval-fraction", "1.5"], ["eval_fraction"]),
    (["--steps", "3", "--optimizer", "sgd"], ["optimizer must be one of"]),
    (["--steps", "3", "--precision", "fp8"], ["precision must be one of"]),
    (["--steps", "3", "--device", "cudax"], ["--device", "'cudax' is not a device"]),
    (["--steps", "3", "--model-arg", "latent_dim"], ["--model-arg expects KEY=VALUE"]),
    (["--steps", "3", "--model-arg", "no_such_arg=1"], ["no_such_arg"]),
    (["--steps", "3", "--data", "no/such/folder"], ["no/such/folder"]),
])
def test_train_bad_flags_are_one_line(capsys, tmp_path, flags, needles):
    status, err = run_cli(capsys, ["train", *TINY, "--out", str(tmp_path / "run"), *flags])
    assert_one_line_error(status, err, *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cuda_without_cuda(capsys, tmp_path):
    status, err = run_cli(capsys, ["train", *TINY, "--steps", "2", "--out", str(tmp_path / "r"),
                                   "--device", "cuda"])
    assert_one_line_error(status, err, "--device", "CUDA is not available")


def test_steps_and_epochs_both_reach_fit(capsys, tmp_path):
    # Item 9: the CLI used to drop both and report "got steps=None, epochs=None".
    status, err = run_cli(capsys, ["train", *TINY, "--steps", "5", "--epochs", "1",
                                   "--out", str(tmp_path / "run")])
    assert_one_line_error(status, err, "give exactly one of steps and epochs",
                          "steps=5", "epochs=1")


def test_flag_length_replaces_the_configs_other_unit(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"train": {"epochs": 50}}))
    status, err = run_cli(capsys, ["train", *TINY, "--config", str(config), "--steps", "2",
                                   "--out", str(tmp_path / "run")])
    assert status == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert max(r["step"] for r in records) == 2


@pytest.mark.parametrize("text, needles", [
    (None, ["--config", "cannot read it", "No such file"]),
    ("{not json", ["--config", "is not valid JSON"]),
    ("[1, 2]", ["--config", "must hold a JSON object"]),
    ('{"model": 3}', ['"model" must be a JSON object']),
    ('{"modle": {}}', ["unknown sections", "modle"]),
    ('{"train": {"stepz": 3}}', ["unknown training options", "stepz"]),
])
def test_bad_config_files(capsys, tmp_path, text, needles):
    config = tmp_path / "config.json"
    if text is not None:
        config.write_text(text)
    status, err = run_cli(capsys, ["train", *TINY, "--steps", "2", "--config", str(config),
                                   "--out", str(tmp_path / "run")])
    assert_one_line_error(status, err, *needles)


def test_encode_and_report_bad_paths(capsys, tmp_path):
    status, err = run_cli(capsys, ["encode", str(tmp_path / "nothing"), str(tmp_path),
                                   str(tmp_path / "store")])
    assert_one_line_error(status, err, "CHECKPOINT", str(tmp_path / "nothing"))
    status, err = run_cli(capsys, ["report", str(tmp_path / "nothing")])
    assert_one_line_error(status, err, str(tmp_path / "nothing"))


def test_truncated_checkpoint_names_the_file(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, ["train", *TINY, "--steps", "2", "--out", str(run)])[0] == 0
    state = run / "checkpoint" / "state.pt"
    state = state if state.exists() else next((run / "checkpoint").resolve().glob("state*"))
    state.write_bytes(state.read_bytes()[:100])
    status, err = run_cli(capsys, ["train", *TINY, "--steps", "4", "--out", str(run),
                                   "--resume"])
    assert_one_line_error(status, err, "state")


def test_bench_with_no_matching_case(capsys):
    import os
    import subprocess
    import sys
    if not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run.py")):
        pytest.skip("not a source checkout")
    done = subprocess.run([sys.executable, "-m", "pyvae.cli", "bench", "-k", "no_such_case_xyz"],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "no benchmark case matches -k 'no_such_case_xyz'" in done.stderr


def test_keyboard_interrupt_is_status_130(capsys, monkeypatch):
    import pyvae.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    status, err = run_cli(capsys, ["info"])
    assert status == 130 and err.strip() == "pyvae info: interrupted"


def test_bugs_keep_their_traceback(monkeypatch):
    import pyvae.cli as cli

    def bug(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli, "cmd_info", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["info"])
