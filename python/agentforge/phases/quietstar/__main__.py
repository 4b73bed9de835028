"""``python -m agentforge.phases.quietstar --model DIR --out DIR``: Quiet-STaR on its own."""
import sys

from agentforge.phases import standalone_main

sys.exit(standalone_main("quietstar", {"model": "input model directory (the EvoMerge champion or any Cognate model)"}))
