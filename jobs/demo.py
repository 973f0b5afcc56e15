"""all three stages end to end on a local Ray. Same flags as `audiodiff demo`; runs as is on a local Ray
and under `ray job submit -- python jobs/demo.py ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout or working_dir

from audiodiff.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
