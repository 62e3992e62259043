"""`accelerate launch -m ironcore.train CONFIG [overrides]`: the `-m` entry point, nothing else.

It is `ironcore train`: the same parser and the same one-line errors. The loop lives in `ironcore.loop`,
which never imports the CLI, so under `-m` (where this file runs as `__main__`) the loop is imported once.
"""

import sys

from ironcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
