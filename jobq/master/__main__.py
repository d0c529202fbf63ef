"""``python -m jobq.master``: the same as ``jobq-master``."""

from ..cli import master_main

if __name__ == "__main__":
    master_main()
