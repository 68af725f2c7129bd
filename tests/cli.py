"""Our scripts' main(argv) run inside the test process, answered like subprocess.run's result:

    result = cli.run(train.main, ["--mode", "grpo", ...], outcome=pseudo_outcome.verify)
    assert result.returncode == 0, result.stderr

A new Python costs ~7 s of CPU for its imports (torch, transformers) on our 2-core machines, most
of what a short run of the tiny model takes. Tests that need a process of their own (signals,
torchrun, thread counts torch reads when it starts) still launch one. As in the launched runs,
torch uses one thread (OMP_NUM_THREADS=1), so metrics compare exactly with them; what main
changes of this process (threads, the environment, the outcome, signal handlers) is put back."""
import contextlib
import io
import os
import signal
import subprocess
import sys

import torch

import countdown


def run(main, argv, outcome=None):
    """main(argv) as `python script.py argv...` would run it: sys.exit's code and message, the
    text written to stdout and stderr. An exception other than SystemExit propagates (a traceback
    the launched script would print)."""
    out, err = io.StringIO(), io.StringIO()
    threads, environ = torch.get_num_threads(), dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    verify = countdown.verify
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    countdown.verify = outcome or verify
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(map(str, argv)))
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        countdown.verify = verify
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
