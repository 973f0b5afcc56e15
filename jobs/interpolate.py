"""clips between two inputs through their DDIM-inverted noise -> WAV, PNG, manifest. Same flags as
`audiodiff interpolate`; runs as is on a local Ray and under `ray job submit -- python jobs/interpolate.py ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout or working_dir

from audiodiff.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["interpolate", *sys.argv[1:]]))
