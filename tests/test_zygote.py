"""The tests' fork server (tests/zygote.py) must be indistinguishable from `python script.py flags`: argv, working
directory, environment, output, exit codes, signals passed on, and a SIGKILL of the run's process ending the script."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import harness
from harness import ZYGOTE, fork_server

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("ZYGOTE_PROBE"), "path0", sys.path[0])
    print("to stderr", file=sys.stderr)
    open("pid", "w").write(str(os.getpid()))
    if sys.argv[1] == "exit":
        sys.exit(int(sys.argv[2]))
    if sys.argv[1] == "fail":
        raise RuntimeError("boom")
    if sys.argv[1] == "handle":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print("waiting", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def through_the_server(tmp_path):
    address = fork_server()
    if address is None:
        pytest.skip("the fork server is off (CLEANRL_MOE_TEST_FORK=0)")
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    return lambda *flags: [sys.executable, "-S", str(ZYGOTE), "run", address, str(script), *flags]


def start(command, cwd):
    return subprocess.Popen(command, cwd=cwd, env=dict(harness.test_env(), ZYGOTE_PROBE="yes"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_run_sees_its_argv_directory_environment_and_output(through_the_server, tmp_path):
    proc = start(through_the_server("exit", "3"), tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert out.splitlines()[0] == f"argv ['exit', '3'] cwd {tmp_path} env yes path0 {tmp_path}"
    assert err == "to stderr\n"
    proc = start(through_the_server("fail"), tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "RuntimeError: boom" in err


def wait_for_line(proc, line):
    assert proc.stdout.readline().startswith("argv")
    assert proc.stdout.readline().strip() == line


@pytest.mark.parametrize("handled", [True, False])
def test_signals_reach_the_script(through_the_server, tmp_path, handled):
    proc = start(through_the_server("handle" if handled else "wait"), tmp_path)
    wait_for_line(proc, "waiting")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == (143 if handled else -signal.SIGTERM)


def test_killing_the_run_kills_the_script(through_the_server, tmp_path):
    proc = start(through_the_server("wait"), tmp_path)
    wait_for_line(proc, "waiting")
    pid = int((tmp_path / "pid").read_text())
    assert pid != proc.pid
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z"):
            return  # ended, not yet reaped by its parent
        time.sleep(0.05)
    raise AssertionError("the script outlived the killed run")
