"""``python -m jobq.master``: the same as ``jobq-master``."""

from ..cli.master import main

if __name__ == "__main__":
    main()
