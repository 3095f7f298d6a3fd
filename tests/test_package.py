"""The package itself: importable without triton, the CLI, the backend report."""
import os
import subprocess
import sys

import pytest
import torch

import pyvae
from pyvae.cli import main
from pyvae.ops import _backend


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


@pytest.mark.parametrize("op", _backend.KERNEL_OPS)
@pytest.mark.parametrize("step", ["forward", "backward"])
def test_triton_twin_has_the_cpp_schema(op, step):
    # pyvae.ops._register defines each Triton op from a schema string written in Python: it must
    # stay the schema of csrc/ops/<op>.cpp, so that the backends are called the same way.
    if _backend.EXTENSION_ERROR is not None:
        pytest.skip(_backend.EXTENSION_ERROR)
    cpp = str(getattr(torch.ops.pyvae, f"{op}_{step}").default._schema)
    triton = str(getattr(torch.ops.pyvae, f"{op}_{step}_triton").default._schema)
    assert triton.replace(f"{op}_{step}_triton(", f"{op}_{step}(") == cpp


def test_every_op_is_a_kernel_op():
    assert sorted(_backend.KERNEL_OPS) == ["kl_decomposition", "masked_conv2d",
                                           "reparameterize_kl"]


def test_backend_status_and_auto_backend():
    status = pyvae.ops.backend_status("cpu")
    assert list(status) == list(_backend.BACKENDS) and status["reference"] is None
    assert "CUDA tensors only" in status["cuda"]
    assert pyvae.ops.auto_backend("cpu") == ("cpu" if status["cpu"] is None else "reference")
    assert pyvae.ops.auto_backend("cpu") in pyvae.ops.available_backends("cpu")
