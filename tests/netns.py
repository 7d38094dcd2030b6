"""Runs a command in a private network namespace that holds only loopback.

    python tests/netns.py COMMAND ARGS...

The multi-process tests start servers (TensorFlow's gRPC server listens on
every interface, whatever `TF_CONFIG` says), so they run inside a user and
network namespace of their own (`unshare -rnu`, no privileges needed):
nothing outside it can reach the workers, and they reach nothing outside.
This script re-executes itself under `unshare`, brings `lo` up (it starts
down in a new namespace), checks that `lo` is the only interface and
replaces itself with COMMAND.
"""

import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys

_INSIDE = "KERAS_NORMS_PRIVATE_NETWORK"


def unavailable_reason():
    """Why a private network namespace cannot be made here, else None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "the `unshare` command (util-linux) is not installed"
    result = subprocess.run(
        [unshare, "-rnu", "true"], capture_output=True, text=True
    )
    if result.returncode:
        return (
            "`unshare -rnu` fails here (unprivileged user namespaces are "
            f"disabled?): {result.stderr.strip()}"
        )
    return None


def _loopback_up():
    get_flags, set_flags, up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, get_flags, request))[1]
        request = struct.pack("16sH", b"lo", flags | up)
        fcntl.ioctl(s, set_flags, request)


def main(command):
    if os.environ.get(_INSIDE) != "1":
        reason = unavailable_reason()
        if reason:
            sys.exit(f"no private network namespace: {reason}")
        unshare = shutil.which("unshare")
        env = dict(os.environ, **{_INSIDE: "1"})
        argv = [unshare, "-rnu", sys.executable, os.path.abspath(__file__)]
        os.execve(unshare, argv + command, env)
    interfaces = [name for _, name in socket.if_nameindex()]
    if interfaces != ["lo"]:
        sys.exit(f"the namespace is not private: {interfaces}")
    _loopback_up()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
