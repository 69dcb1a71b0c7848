"""A helper process for the CLI tests: imports torch and dcpx once, then runs each ``dcpx``
command in its own forked child, exactly as ``python -m dcpx`` would run it (``dcpx.__main__``
with the command's argv, environment, working directory and stdio; its exit status).

Importing torch's checkpoint package costs seconds of CPU per process; forking skips that.
The zygote never loads plugins or runs torch operations itself, so it has no threads when it
forks.  Requests arrive as JSON lines on stdin: a list of commands, all forked at once; the
answer is one JSON line with their exit codes.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback

import torch  # noqa: F401  (the expensive imports, done once)
import torch.distributed.checkpoint  # noqa: F401

import dcpx.bench  # noqa: F401
import dcpx.cli  # noqa: F401
import dcpx.convert  # noqa: F401
import dcpx.inspect  # noqa: F401
import dcpx.verify  # noqa: F401


def child(cmd: dict) -> None:
    """Become ``python -m dcpx ARGS`` (never returns)."""
    code = 1
    try:
        os.chdir(cmd["cwd"])
        os.environ.clear()
        os.environ.update(cmd["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, cmd["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, cmd["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = ["dcpx", *cmd["args"]]
        try:
            runpy.run_module("dcpx", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        batch = json.loads(line)
        sys.stdout.flush()
        pids = []
        for cmd in batch:
            pid = os.fork()
            if pid == 0:
                child(cmd)
            pids.append(pid)
        codes = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            codes.append(os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
        print(json.dumps(codes), flush=True)


if __name__ == "__main__":
    main()
