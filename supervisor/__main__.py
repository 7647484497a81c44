"""`python -m supervisor`: the taskvisor command line, the same as the `taskvisor` script.

Owns nothing but the hand-off to `supervisor.cli.main`; it must not parse arguments itself.
"""

import sys

from supervisor.cli import main

if __name__ == "__main__":
    sys.exit(main())
