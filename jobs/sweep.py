"""spectrogram dataset -> a sweep of fine-tunes on Ray Tune and its best pipeline. Same flags as `audiodiff sweep`;
runs as is on a local Ray and under `ray job submit -- python jobs/sweep.py ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout or working_dir

from audiodiff.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
