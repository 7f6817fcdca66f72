"""`exam-retention`: not built yet; every subcommand says so plainly and exits 1."""

from __future__ import annotations

import click

NOT_YET = ("exam-retention {name}: not yet implemented (tracked in issue 5, retention job); "
           "nothing was deleted or changed")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(), help="Collector config TOML.")
def main(config_path: str | None) -> None:
    """Enforce the one-year floor and legal holds, scrub and audit stored footage."""


def _not_yet(name: str) -> None:
    @main.command(name=name, help=f"{name}: not yet implemented (issue 5).",
                  context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        click.echo(NOT_YET.format(name=name), err=True)
        raise SystemExit(1)


for _name in ("enforce", "audit", "scrub", "verify-log"):
    _not_yet(_name)
