"""`--tls-ca`, `--tls-cert`, `--tls-key`, `--token-file` for the commands that open
channels to the services (generate, health, info, bench serve).

The token itself is never an option (argv shows in `ps`): it comes from the token file
(its first line) or the environment variable HYBRID_TOKEN. transport.security, which
imports grpc, is imported only when the options are turned into a Security.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from transport.security import Security

NAMES = ("tls_ca", "tls_cert", "tls_key", "token_file")
_OPTIONS = [
    click.option("--tls-ca", envvar="HYBRID_TLS_CA", show_envvar=True, default=None,
                 help="CA (PEM) that verifies the services' certificates: TLS on"),
    click.option("--tls-cert", envvar="HYBRID_TLS_CERT", show_envvar=True, default=None,
                 help="client certificate (PEM) for mutual TLS; needs --tls-key"),
    click.option("--tls-key", envvar="HYBRID_TLS_KEY", show_envvar=True, default=None,
                 help="private key (PEM) of --tls-cert"),
    click.option("--token-file", envvar="HYBRID_TOKEN_FILE", show_envvar=True, default=None,
                 help="file whose first token is sent as 'authorization: Bearer'; "
                      "or set HYBRID_TOKEN"),
]


def security_options(f):
    """Adds the four options; the command receives tls_ca, tls_cert, tls_key, token_file."""
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


def pop_security(kw: dict) -> dict:
    """Takes the four options out of a command's keyword arguments."""
    return {name: kw.pop(name) for name in NAMES}


def build_security(tls_ca: str | None = None, tls_cert: str | None = None,
                   tls_key: str | None = None, token_file: str | None = None
                   ) -> Security | None:
    """The options (and HYBRID_TOKEN) as a Security; None when none is set. Raises
    engine.errors.InvalidArgument with one line for a missing file, a key without a
    certificate, ..."""
    from transport.security import Security

    return Security.from_options(tls_cert, tls_key, tls_ca, token_file)


def security_or_exit(**opts: str | None) -> Security | None:
    """build_security for commands without their own error path: one line, exit 2."""
    from engine.errors import InvalidArgument

    try:
        return build_security(**opts)
    except InvalidArgument as e:
        err = click.ClickException(str(e))
        err.exit_code = 2
        raise err from None
