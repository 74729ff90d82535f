"""The client side (API, health, info, generation through the services) does not import
torch: `hybrid health` is the compose healthcheck, run every few seconds, and importing
torch made each probe take ~2.7 s and ~270 MB (issue 14, item 5)."""

import subprocess
import sys


def test_client_modules_do_not_import_torch():
    code = ("import sys, client.cli, client.cmd_generate, client.cmd_admin, client.remote, "
            "client.api, client.inputs; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_health_cli_does_not_import_torch():
    code = ("import sys; from client.cli import main\n"
            "try:\n    main(['health', '--prefill', '127.0.0.1:1', '--decode', '127.0.0.1:2'])\n"
            "except SystemExit as e:\n    assert e.code == 1, e.code\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr
