"""The training notebook's TensorBoard cell works from a kernel whose PATH lacks the venv's bin/ (as under JupyterLab)."""

import os
import socket
import subprocess
import sys
import textwrap
import urllib.request

import psutil
from stlib_testing import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_tensorboard_starts_from_the_kernels_venv_without_it_on_path(tmp_path):
    port = free_port()
    script = textwrap.dedent(f"""
        import os
        from stlib import notebook
        notebook.tensorboard({str(tmp_path)!r}, port={port})
        print("BINARY", os.environ["TENSORBOARD_BINARY"])
    """)
    env = {k: v for k, v in os.environ.items() if k != "TENSORBOARD_BINARY"}
    env["PATH"] = "/usr/bin:/bin"  # no venv bin/: bare `%tensorboard` would not find the executable
    env["HOME"] = str(tmp_path)  # tensorboard's record of running instances lives under the temp dir
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"BINARY {os.path.dirname(sys.executable)}/tensorboard" in done.stdout
        with urllib.request.urlopen(f"http://localhost:{port}/", timeout=30) as page:
            assert page.status == 200
            assert b"TensorBoard" in page.read()
    finally:
        for process in psutil.process_iter(["cmdline"]):  # the TensorBoard this test started
            if f"--port {port}" in " ".join(process.info["cmdline"] or []):
                process.kill()
