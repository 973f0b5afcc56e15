"""input tracks continued into long ones, window after window -> WAV, PNG, manifest. Same flags as
`audiodiff continue`; runs as is on a local Ray and under `ray job submit -- python jobs/continue.py ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout or working_dir

from audiodiff.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["continue", *sys.argv[1:]]))
