"""train.py with a pseudo-random outcome, for the tests and bench/torchrun_exits.py that launch it
(tests in this process pass `outcome=pseudo_outcome.verify` to tests/cli.py):

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


def verify(nums, target, text):
    """A third of the completions "verify", by a hash of their text."""
    return zlib.crc32(text.encode()) % 3 == 0


if __name__ in ("__main__", "__mp_main__"):  # launched, or a worker that --procs N spawns from it
    countdown.verify = verify
if __name__ == "__main__":
    train.main(sys.argv[1:])
