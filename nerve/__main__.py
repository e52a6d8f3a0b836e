"""``python -m nerve``: the command line (see :mod:`nerve.cli`)."""

from nerve.cli import main

if __name__ == "__main__":
    main()
