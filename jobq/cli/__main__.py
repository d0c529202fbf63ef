"""``python -m jobq.cli``: the same as ``jobq``."""

from . import main

if __name__ == "__main__":
    main()
