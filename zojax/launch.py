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
import functools
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
_LOST_COORDINATOR_WAIT = 5.0  # seconds the others get to stop once process 0 was killed


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

# When process 0 dies, the coordination service dies with it, and JAX's client in every other
# process aborts that process at once (SIGABRT), racing zojax's watchdog, with a page of C++
# log: jaxlib gives Python no hook to replace that (its client's `missed_heartbeat_callback`
# cannot call a Python function: std::bad_cast). The launcher turns the page into the
# watchdog's one line: the fatal line becomes it, the lines that lead up to it are dropped,
# and so is all that follows (the process is aborting).
_JAX_FATAL = re.compile(rb"^F\d{4} .*Terminating process because the JAX distributed service "
                        rb"detected fatal errors.*?absl::Status: ([A-Z_]+)")
_JAX_LEAD_UP = re.compile(rb"^[WE]\d{4} .*(preemption_sync_manager|Polled an error from "
                          rb"coordination service)|^Additional GRPC error information|"
                          rb"^:UNKNOWN:Error received from peer")
_OWN_STOP = re.compile(rb"^error: process \d+ of \d+ stops: ")


def _jax_fatal_line(line: bytes, process: int, processes: int, address: str) -> bytes:
  """The one line that stands for JAX's fatal page (`_JAX_FATAL`)."""
  status = _JAX_FATAL.search(line).group(1).decode()
  why = (f"lost the coordinator (process 0 at {address}): it was killed, crashed or is "
         f"unreachable" if status == "UNAVAILABLE" and process != 0
         else f"JAX's runtime aborted it ({status})")
  return f"error: process {process} of {processes} stops: {why}\n".encode()


def _pump(stream, out, prefix: bytes, lock: threading.Lock, fatal=None) -> None:
  """Copies a child's output to `out`, each line (or progress-bar redraw) prefixed.

  With `fatal` (a child's stderr), JAX's fatal page is replaced by the line `fatal(its
  fatal line)`, or by nothing where the child already printed why it stops.
  """
  pending, stopped = b"", False
  while chunk := stream.read1(65536):
    pending += chunk
    *pieces, pending = re.split(rb"(?<=[\r\n])", pending)
    done = []
    for piece in pieces:
      if not piece or _NOISE.search(piece) or (fatal and _JAX_LEAD_UP.search(piece)):
        continue
      if fatal and _JAX_FATAL.search(piece):
        done += [] if stopped else [fatal(piece)]
        pending = b""
        while stream.read1(65536):  # the rest of the page
          pass
        break
      stopped |= bool(_OWN_STOP.match(piece))  # the watchdog's line (it may come first)
      done.append(piece)
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
    fatal = functools.partial(_jax_fatal_line, process=i, processes=processes, address=address)
    for stream, out, on_fatal in ((p.stdout, sys.stdout.buffer, None),
                                  (p.stderr, sys.stderr.buffer, fatal)):
      t = threading.Thread(target=_pump, args=(stream, out, prefix, lock, on_fatal),
                           daemon=True)
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
          if deadline is None:  # give the others time to stop on their own, unless they
            # cannot know: a killed process other than 0 is noticed only after the
            # heartbeat timeout (a killed process 0 takes its coordination service along,
            # and the others stop at once)
            wait = grace if code > 0 else _LOST_COORDINATOR_WAIT if i == 0 else 0.0
            deadline = time.monotonic() + wait
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
