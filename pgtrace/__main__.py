"""Allow `python -m pgtrace`."""

from pgtrace.cli import main

main()
