"""A fork server for the tests' script runs.

Most of a tiny end-to-end test is the start of a fresh Python that imports torch, gymnasium, ALE, tyro, TensorBoard
and torch._dynamo (which a torch optimizer imports when it is built): about 4-5 CPU-seconds a run, on a 2-core machine
a third of the suite. Here one server process per pytest worker imports them once (one thread, no CUDA), and forks a
child per run that becomes `python script.py flags`: the same argv, working directory, environment,
stdin/stdout/stderr (passed over a Unix socket), signals and exit status. The command that `harness.script_command`
returns starts a small client (no torch) that stands for the run: a signal sent to it is passed on to the script, its
exit code is the script's, and killing it (SIGKILL) kills the script. A run whose environment asks for something the
server did not import under (threads, a GPU) execs a fresh interpreter instead. CLEANRL_MOE_TEST_FORK=0 turns the
server off.

    python -u tests/zygote.py serve SOCKET            # prints "ready" once it listens
    python -S tests/zygote.py run SOCKET SCRIPT FLAGS...
"""
import json
import os
import signal
import socket
import struct
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
PRELOADED_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # what the server imported torch under


def send_message(conn, data, fds=()):
    payload = json.dumps(data).encode()
    message = struct.pack("!I", len(payload)) + payload
    if fds:
        socket.send_fds(conn, [message], list(fds))
    else:
        conn.sendall(message)


def receive_message(conn, with_fds=False):
    """(data, fds) of one length-prefixed JSON message; (None, []) at EOF."""
    fds, buffer = [], b""
    while len(buffer) < 4 or len(buffer) < 4 + struct.unpack("!I", buffer[:4])[0]:
        if with_fds and not fds:
            chunk, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        else:
            chunk = conn.recv(1 << 16)
        if not chunk:
            return None, fds
        buffer += chunk
    return json.loads(buffer[4:4 + struct.unpack("!I", buffer[:4])[0]]), fds


# ---------------------------------------------------------------------------------------------------------------------
# The client: stands for the run in the test's process tree
# ---------------------------------------------------------------------------------------------------------------------
def client(address, script, *flags):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(address)
    send_message(conn, {"argv": [script, *flags], "cwd": os.getcwd(), "env": dict(os.environ)}, fds=(0, 1, 2))
    started, _ = receive_message(conn)
    if started is None:
        sys.exit("zygote: the fork server closed the connection")
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, frame: os.kill(started["pid"], signum))
    ended, _ = receive_message(conn)
    if ended is None:
        sys.exit("zygote: the fork server closed the connection")
    if ended["signal"]:  # die of the same signal, as the script did
        signal.signal(ended["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), ended["signal"])
    os._exit(ended["code"])


# ---------------------------------------------------------------------------------------------------------------------
# The server and its children
# ---------------------------------------------------------------------------------------------------------------------
def become_the_script(conn, request, fds):
    """In the forked child: take the client's stdio, directory, environment and argv, and run the script."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    os.chdir(request["cwd"])
    env, argv = request["env"], request["argv"]
    if any(env.get(key) != value for key, value in PRELOADED_ENV.items()):
        os.execve(sys.executable, [sys.executable, *argv], env)
    os.environ.clear()
    os.environ.update(env)

    import atexit
    import runpy
    import threading
    import traceback

    def die_with_the_client():  # the client sends nothing more: EOF means it is gone (a SIGKILL)
        conn.recv(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=die_with_the_client, daemon=True).start()
    sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as error:
        code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        if not isinstance(error.code, int) and error.code is not None:
            print(error.code, file=sys.stderr)
    except KeyboardInterrupt:  # uncaught, Python dies of SIGINT
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code)


def handle(conn):
    """In a child of the server: fork the script, tell the client its pid, wait, report how it ended."""
    request, fds = receive_message(conn, with_fds=True)
    if request is None:
        return
    pid = os.fork()
    if pid == 0:
        try:
            become_the_script(conn, request, fds)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    send_message(conn, {"pid": pid})
    _, status = os.waitpid(pid, 0)
    ended = {"code": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1,
             "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}
    try:
        send_message(conn, ended)
    except OSError:  # the client is gone
        pass


def serve(address):
    os.environ.update(PRELOADED_ENV)
    try:  # die with the pytest worker that started this server
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    import ale_py  # noqa: F401
    import gymnasium  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (imported by every optimizer's constructor: ~2 CPU-seconds a run)
    import torch.nn.functional  # noqa: F401
    import tyro  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            try:
                handle(conn)
            finally:
                os._exit(0)
        conn.close()
        try:  # reap the children whose runs ended
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        client(*sys.argv[2:])
