"""Reach this machine's sshd from anywhere, through an unencrypted tunnel.

SSH brings its own encryption and speaks raw TCP, so the tunnel is a plain
TCP port on the relay (`unencrypted=True`); this prints the ssh command to
use, and keeps the tunnel open until Ctrl-C or `--seconds` have passed.

    set -a; . relay-state/client.env; set +a
    python scripts/examples/ssh_tunnel.py              # sshd on port 22
    python scripts/examples/ssh_tunnel.py --port 2222 --user alice
    # ssh -p 24817 alice@localhost
"""

import argparse
import getpass
import threading

from client import forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=22, help="the local sshd's port (default 22)")
    parser.add_argument("--user", default=getpass.getuser(), help="the user name to print")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    args = parser.parse_args()

    try:
        with forward(args.port, unencrypted=True) as tunnel:
            host, port = tunnel.tcp_socket
            print(f"ssh -p {port} {args.user}@{host}", flush=True)
            threading.Event().wait(args.seconds)
    except KeyboardInterrupt:
        pass
    print("Stopped.", flush=True)


if __name__ == "__main__":
    main()
