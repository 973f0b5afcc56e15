"""Fréchet distance of generated clips against reference audio or a spectrogram dataset. Same flags as
`audiodiff evaluate`; runs as is on a local Ray and under `ray job submit -- python jobs/evaluate.py ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout or working_dir

from audiodiff.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
