"""The in-job check of a multi-node submission: ``python -m gpt2exp.jobs.checked_run OUTPUT GPT2EXP_ARGS...``.

A client cannot see from outside whether the output folder is on a filesystem that every node shares, so the
job's driver checks it before training: a marker it writes there must be visible from a task on every alive
node. Then the same process runs ``gpt2exp GPT2EXP_ARGS`` (one process: see ``gpt2exp.jobs.submit.entrypoint``).

The gpt2exp command is run by its module path, as ``python -m gpt2exp.cli`` would run it, not imported: the jobs
package sits below the CLI, which imports it."""

from __future__ import annotations

import runpy
import socket
import sys
from pathlib import Path

from gpt2exp import env

CLI_MODULE = "gpt2exp.cli"


def check_shared(output: str, timeout: float = 300.0) -> int:
    """In the job, before training: a marker the driver writes into ``output`` must be visible on every alive
    node (a remote task pinned to each node looks for it). Prints one line and returns an exit code; leaves
    Ray connected (as ``ensure_ray`` would connect) for the run that follows in this process."""
    import uuid

    env.apply(env.RAY)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".gpt2exp-shared-check-{uuid.uuid4().hex[:12]}"
        marker.write_text(socket.gethostname())
    except OSError as e:
        print(f"error: --output {output} cannot be written on the head node: {e}", file=sys.stderr, flush=True)
        return 2

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        return Path(path).is_file()

    try:
        if not ray.is_initialized():
            ray.init(log_to_driver=False, configure_logging=False, include_dashboard=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        refs = {
            n["NodeManagerAddress"]: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        }
        blind = [ip for ip, ref in refs.items() if not ray.get(ref, timeout=timeout)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        print(
            f"error: --output {output} is not shared: node(s) {', '.join(blind)} do not see files the head node writes there; "
            "mount the same shared filesystem at that path on every node",
            file=sys.stderr,
            flush=True,
        )
        return 2
    print(f"output {output} is shared by all {len(nodes)} node(s)", flush=True)
    return 0


def main(argv: list[str]) -> int:
    """``OUTPUT GPT2EXP_ARGS...``: the shared-folder check, then ``gpt2exp GPT2EXP_ARGS`` in this process
    (exits with the command's code)."""
    if len(argv) < 2:
        print("usage: python -m gpt2exp.jobs.checked_run OUTPUT_FOLDER GPT2EXP_ARGS...", file=sys.stderr)
        return 2
    code = check_shared(argv[0])
    if code:
        return code
    sys.argv = [sys.argv[0], *argv[1:]]
    runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
