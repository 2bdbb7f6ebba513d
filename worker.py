"""Run the outbox worker from the environment: ``python worker.py``.

Settings come from OUTBOX_DATABASE_URL (default sqlite:///outbox.db), SOCKUDO_URL and the other
OUTBOX_* variables listed by ``outbox worker --help``. Extra arguments are passed on as flags,
e.g. ``python worker.py --once``.
"""

import sys

from outbox.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
