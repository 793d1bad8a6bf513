"""The ``sat`` command: a thin click front end. Each command builds a config and calls a library ``run``.

User errors (:class:`saliency_cache.errors.SatError`) become a one-line message on stderr and
exit code 2; click's own usage errors also exit 2.
"""

from __future__ import annotations

import sys

import click

from saliency_cache.errors import SatError


class SatGroup(click.Group):
    """A click group that reports :class:`SatError` as ``error: ...`` with exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SatError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=SatGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sat-pipeline")
def main() -> None:
    """Saliency-based adversarial training: precompute saliency maps into a store, train, evaluate."""


def _attach() -> None:
    from saliency_cache.cli import cache

    main.add_command(cache)


_attach()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
