"""``python -m pdp`` runs the CLI."""

from pdp.cli import main

main()
