"""Small helpers shared by the test files: a free TCP port for gloo process groups, and the
sm_90 compile check of Triton kernels without a GPU."""
import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def compile_for_hopper(script: str) -> None:
    """Run `script` (which compiles kernels for sm_90 and prints "compiled") in a process
    without TRITON_INTERPRET; skip where Triton's ptxas is missing, fail on any other error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
