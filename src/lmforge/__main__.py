"""Allow ``python -m lmforge`` (and ``torchrun -m lmforge``)."""

from lmforge.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
