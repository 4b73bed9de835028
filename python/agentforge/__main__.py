"""``python -m agentforge ...`` and ``torchrun ... -m agentforge run ...``: the ``agentforge`` command."""

import sys

from agentforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
