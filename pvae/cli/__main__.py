"""``python -m pvae.cli ...``: the ``pvae`` command."""

from pvae.cli import main

main()
