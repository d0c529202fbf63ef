"""``python -m jobq.master``: the same as ``jobq-master``."""

from .cli import master_command

if __name__ == "__main__":
    master_command(prog_name="jobq-master")
