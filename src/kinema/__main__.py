"""``python -m kinema`` (and ``torchrun -m kinema``) runs the CLI."""

from kinema.cli import main

raise SystemExit(main())
