"""``python -m ingestd`` and the ``ingestd`` console script.

The command's modules load here, inside the guard: loading takes a few tenths of a second
(peewee, psycopg), and Ctrl-C then must end the command as quietly as it does later."""

import sys


def main() -> int:
    try:
        from ingestd.cli import main as run_command
    except KeyboardInterrupt:
        return 130
    return run_command()


if __name__ == "__main__":
    sys.exit(main())
