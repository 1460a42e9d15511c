"""`llmos join`: what a machine elsewhere needs to reach this kernel over its
TLS listener (`llmos boot --listen HOST:PORT`): the address, the CA file that
vouches for the kernel, and how to get a token, as shell lines to paste there."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from llmagentos.syscalls import paths

from .cli_io import EXIT_OK, UsageError, client, out

CA_COPY = "llmagentos-ca.pem"  # what the pasted lines call the CA file there


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    j = sub.add_parser("join", parents=[common],
                       help="what another machine needs to reach this kernel over TLS")
    j.set_defaults(fn=cmd_join)


def cmd_join(args: argparse.Namespace) -> int:
    with client(args) as c:
        info = c.sys.uname()
    if not info.get("tls"):
        raise UsageError("this kernel has no TLS listener: boot it with --listen HOST:PORT "
                         "(e.g. --listen 0.0.0.0:7443)")
    ca_file = info.get("tls_ca")
    token_file = str(Path(info["run_dir"]) / paths.TOKEN_NAME)
    data = {"address": info["tls"], "ca_file": ca_file,
            "ca_pem": Path(ca_file).read_text() if ca_file else None,
            "token_file": token_file, "host": socket.gethostname()}
    out(args, data, _instructions)
    return EXIT_OK


def _instructions(d: dict) -> None:
    print("# On the other machine (with llmagentos installed), in a shell:")
    if d["ca_pem"]:
        print(f"# 1. the CA that vouches for this kernel (public; from {d['ca_file']})")
        print(f"cat > {CA_COPY} <<'EOF'\n{d['ca_pem'].strip()}\nEOF")
        print(f"export {paths.ENV_CA}=\"$PWD/{CA_COPY}\"")
    else:
        print("# 1. the kernel serves a certificate of your own (--tls-cert): set "
              f"{paths.ENV_CA} to the CA file that signed it,\n#    or leave it unset if "
              "the system's CAs trust it")
    print(f"# 2. where the kernel listens\nexport {paths.ENV_ADDRESS}={d['address']}")
    print("# 3. a token: a secret, so fetch it over an encrypted channel such as ssh, never "
          "in clear\n#    (this one is the shell user's, with all its rights)")
    print(f"export {paths.ENV_TOKEN}=\"$(ssh {d['host']} cat {d['token_file']})\"")
    print("llmos status")
