"""The `hybrid` command line. Each subcommand lives in its own module and is imported
only when used, so `hybrid --help` stays fast and one broken extra never breaks the rest."""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "generate": "client.cmd_generate:generate",
    "serve": "client.cmd_serve:serve",
    "health": "client.cmd_admin:health",
    "info": "client.cmd_admin:info",
    "demo": "client.cmd_demo:demo",
    "plan": "client.cmd_plan:plan",
    "bench": "client.cmd_bench:bench",
}


# modules of pyproject.toml's `serve` extra, absent from a light (client-only) install
SERVE_EXTRA = frozenset({"torch", "numpy", "safetensors", "tokenizers", "xxhash",
                         "grpc_reflection"})


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:  # a light install: one line, not a traceback
            if (e.name or "").partition(".")[0] not in SERVE_EXTRA:
                raise
            raise click.ClickException(
                f"this command needs {e.name}, which this (client-only) install lacks: "
                f"serve prefill|decode, generate --local, demo and bench need the serve "
                f"extra: pip install 'hybrid-llm[serve]'") from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if self.get_command(ctx, n) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name == module:  # command not built in this checkout
                return None
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """GPU prefill + FPGA decode LLM inference."""


if __name__ == "__main__":
    main()
