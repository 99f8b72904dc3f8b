"""``python -m tools.toy``: see :mod:`tools.toy.cli`."""
from .cli import main

main()
