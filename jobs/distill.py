"""Ray job entry point for a recursive-distillation pipeline.

    ray job submit --working-dir . -- python jobs/distill.py --pipeline pipelines/demo.yaml
    ray job submit --working-dir . -- python jobs/distill.py --pipeline pipelines/demo.yaml --run-id <id>  # resume
"""

import sys

from facescale.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
