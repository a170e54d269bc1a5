"""``python -m xception`` (and ``torchrun -m xception``) runs the command line."""

from xception.cli import main

raise SystemExit(main())
