"""train.py with a pseudo-random outcome, for the tests and bench/torchrun_exits.py that launch it:

    python tests/pseudo_outcome.py --mode grpo --model DIR ...        # any train.py flags
    torchrun --nproc_per_node=2 tests/pseudo_outcome.py ...

A random tiny model never solves a problem, so the outcome is a fixed pseudo-random function of
the completion instead: rewards vary, advantages are non-zero, weights move."""
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import countdown  # noqa: E402
import train  # noqa: E402

countdown.verify = lambda nums, target, text: zlib.crc32(text.encode()) % 3 == 0

if __name__ == "__main__":
    train.main(sys.argv[1:])
