"""variations, in- and outpainting of input tracks' slices (or whole tracks) -> WAV, PNG, manifest. Same flags as
`audiodiff remix`; runs as is on a local Ray and under `ray job submit -- python jobs/remix.py ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout or working_dir

from audiodiff.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["remix", *sys.argv[1:]]))
