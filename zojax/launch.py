"""Runs one zojax run as N local processes, for trying and testing multi-process runs:

  python -m zojax.launch --processes 2 --devices_per_process 4 -- --config ... --workdir ...

Each process is ``python -m zojax.run <run arguments>`` with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` added, on `--devices_per_process` fake CPU devices
with CPU collectives (gloo) between processes: the same program a cluster runs, one
process per host. Their output is streamed with a ``[i]`` prefix. When a process fails the
others stop on their own (`zojax.train.distributed`); the launcher waits `--grace` seconds
for that, then ends whatever is left, and exits with the failed process's status, naming
it. Real clusters do not need it: see the README ("Many processes / pods").
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# `zojax.train.distributed.STOPPED` (not imported: that module imports JAX).
STOPPED = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices_per_process: int, base: dict | None = None) -> dict:
  """The environment of each process: CPU only, this many devices, gloo collectives."""
  env = dict(os.environ if base is None else base)
  # A forced host device count would fight JAX_NUM_CPU_DEVICES.
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  if flags.strip():
    env["XLA_FLAGS"] = flags.strip()
  else:
    env.pop("XLA_FLAGS", None)
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONUNBUFFERED="1")
  return env


# Known noise: gloo prints a line per device it connects (for every collective group), and
# the coordination service warns that recoverable mode drops its shutdown barrier (zojax
# `distributed.finish` keeps one).
# gloo's threads write unsynchronized, so its lines may come interleaved: match the pieces.
_NOISE = re.compile(rb"\[Gloo\] Rank |is connected to \d+ peer ranks|peer ranks\. Expected"
                    rb"|^W\d{4} .*Using experimental recoverable task feature")


def _pump(stream, out, prefix: bytes, lock: threading.Lock) -> None:
  """Copies a child's output to `out`, each line (or progress-bar redraw) prefixed."""
  pending = b""
  while chunk := stream.read1(65536):
    pending += chunk
    *done, pending = re.split(rb"(?<=[\r\n])", pending)
    done = [piece for piece in done if piece and not _NOISE.search(piece)]
    if done:
      with lock:
        out.write(b"".join(prefix + piece for piece in done))
        out.flush()
  if pending:
    with lock:
      out.write(prefix + pending + b"\n")
      out.flush()


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"was killed by signal {-code}"
  return f"exited with status {code}"


def launch(run_args: list[str], processes: int, devices_per_process: int, *,
           port: int = 0, grace: float = 30.0, python: str = sys.executable,
           on_start=None) -> int:
  """Runs the group; returns 0, or the failed process's exit status (128 + signal if it
  was killed). `on_start(popen_list)` is called once all have started (tests use it)."""
  address = f"127.0.0.1:{port or _free_port()}"
  env = child_env(devices_per_process)
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(processes):
    cmd = [python, "-m", "zojax.run", *run_args, "--coordinator_address", address,
           "--num_processes", str(processes), "--process_id", str(i)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    prefix = f"[{i}] ".encode()
    for stream, out in ((p.stdout, sys.stdout.buffer), (p.stderr, sys.stderr.buffer)):
      t = threading.Thread(target=_pump, args=(stream, out, prefix, lock), daemon=True)
      t.start()
      pumps.append(t)
  if on_start is not None:
    on_start(procs)

  failures = {}       # process -> status, in the order they were seen
  deadline = None     # when to end the processes still running after a failure
  try:
    while True:
      running = False
      for i, p in enumerate(procs):
        code = p.poll()
        running |= code is None
        if code and i not in failures:
          failures[i] = code
          if deadline is None:  # killed: nobody will tell the others; else give them time
            deadline = time.monotonic() + (grace if code > 0 else 0.0)
      if not running:
        break
      if deadline is not None and time.monotonic() >= deadline:
        _end(procs)
        deadline = float("inf")
      time.sleep(0.05)
  except KeyboardInterrupt:
    _end(procs)
    raise
  for t in pumps:
    t.join(timeout=5)
  if not failures:
    return 0
  # Blame the first process that failed on its own, not one stopped because of it.
  i, code = next(((i, c) for i, c in failures.items() if c != STOPPED),
                 next(iter(failures.items())))
  print(f"zojax.launch: process {i} of {processes} {_describe(code)}; the run stopped",
        file=sys.stderr, flush=True)
  return code if code > 0 else 128 - code


def _end(procs, wait: float = 5.0) -> None:
  """SIGTERM to every process still running, SIGKILL to those left after `wait` s."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + wait
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if "--" not in argv:
    print("usage: python -m zojax.launch [options] -- <python -m zojax.run arguments>",
          file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(prog="python -m zojax.launch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2, help="processes to start")
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="fake CPU devices in each process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--grace", type=float, default=30.0,
                      help="seconds the others get to stop on their own after a failure")
  args = parser.parse_args(argv[:split])
  for flag in ("processes", "devices_per_process"):
    if getattr(args, flag) < 1:
      print(f"error: --{flag}={getattr(args, flag)} must be >= 1", file=sys.stderr)
      return 2
  return launch(argv[split + 1:], args.processes, args.devices_per_process, port=args.port,
                grace=args.grace)


if __name__ == "__main__":
  sys.exit(main())
