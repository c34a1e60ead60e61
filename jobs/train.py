"""Ray job entry point for one training run.

    ray job submit --working-dir . -- python jobs/train.py --config configs/demo.yaml train.lr=0.2
"""

import sys

from facescale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
