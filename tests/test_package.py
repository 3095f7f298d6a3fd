"""The package itself: importable without triton, the CLI, the backend report."""
import os
import subprocess
import sys

import torch

import pyvae
from pyvae.cli import main


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import pyvae, torch\n"
            "print(pyvae.ops.available_backends('cpu'))\n"
            "from pyvae.ops import _backend\n"
            "print(_backend.unavailable_reason('triton', 'cpu'))\n"
            "z, kl = pyvae.ops.reparameterize_kl(torch.randn(3, 4), torch.randn(3, 4))\n"
            "print(z.shape, kl.shape)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"TRITON_INTERPRET": "1", "PATH": ""}, check=True)
    lines = result.stdout.splitlines()
    assert "triton" not in lines[0]
    assert lines[1] == "triton is not installed"
    assert lines[2] == "torch.Size([3, 4]) torch.Size([3])"


def test_cli_help_and_info(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert "info" in capsys.readouterr().out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"pyvae {pyvae.__version__}, torch {torch.__version__}" in out
    assert "reference  available" in out


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "pyvae")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"pyvae {pyvae.__version__}"
