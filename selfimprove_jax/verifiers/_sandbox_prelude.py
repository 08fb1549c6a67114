"""What runs inside the sandbox around the program, and the channel protocol both sides share.

``sandbox.py`` ships this file's source to the sandboxed interpreter as
``python -I -c <source> CHANNEL_FD [socket_filter]``. There ``run()`` executes ``main.py`` as
``__main__``, then each step of ``steps.json`` (``["exec", statement]`` or ``["eval",
expression]``) in the same namespace, and writes one JSON line per event to the channel fd:

  {"pid": p, "i": k, "value": encode(v)}   step k evaluated to v (None for "exec" steps)
  {"pid": p, "i": k | null, "error": "Type: message", "type": "Type", "errno": n | null}
                                            main.py (i null) or step k raised; nothing runs after
  {"pid": p, "done": true}                 main.py and every step ran to their end

All of this runs in the program's own process, so the program can rewrite or forge any of it: the
host (``read_channel``) takes a line only as a claim of the program's first process. What the host
can rely on is that a value it decodes is plain data (``decode`` builds only None, bool, int,
float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset, nested at most
``MAX_DEPTH`` deep, no set or dict with more than ``MAX_SAME_HASH`` keys of one hash; no range,
whose length a host-side ``list()`` could not bound), so comparing it runs none of the program's
code. ``encode`` reads subclasses of plain types through their base
type (an ``int`` subclass whose ``__eq__`` always returns True travels as the plain int); anything
else is refused.

Standard library only, and nothing from the package (the sandbox uid may not be able to read it).
"""
import os
import sys

MAX_DEPTH = 100  # nesting of encoded values; the host refuses deeper ones
MAX_SAME_HASH = 8  # distinct keys of one set or dict that may share a hash; the host refuses more


def few_collisions(keys):
  """``keys`` as a list, or ValueError when more than ``MAX_SAME_HASH`` of them share a hash:
  building a set or dict of n keys with one hash costs n**2 / 2 comparisons (ints that differ by
  multiples of 2**61 - 1 hash alike), so a forged value could stall the host."""
  keys, distinct = list(keys), {}
  for key in keys:
    # hash(key) is an int h with hash(h) == h (but for -1), so ``distinct`` itself stays linear.
    same = distinct.setdefault(hash(key), [])
    if key not in same:
      same.append(key)
      if len(same) > MAX_SAME_HASH:
        raise ValueError(f"more than {MAX_SAME_HASH} distinct keys share one hash")
  return keys


def encode(value, depth=0):
  """Plain ``value`` as JSON-ready lists tagged by type; TypeError for anything else."""
  if depth > MAX_DEPTH:
    raise ValueError(f"value nested deeper than {MAX_DEPTH}")
  d = depth + 1
  if value is None or value is True or value is False:
    return value
  if isinstance(value, int):
    return ["i", hex(int.__int__(value))]
  if isinstance(value, float):
    return ["f", float.hex(float.__float__(value))]
  if isinstance(value, complex):
    return ["c", float.hex(complex.real.__get__(value)), float.hex(complex.imag.__get__(value))]
  if isinstance(value, str):
    return ["s", str.__str__(value)]
  if isinstance(value, (bytes, bytearray)):
    base = bytes if isinstance(value, bytes) else bytearray
    return ["b" if base is bytes else "ba", base.hex(value)]
  if isinstance(value, dict):
    return ["d", [[encode(k, d), encode(x, d)] for k, x in dict.items(value)]]
  for base, tag in ((tuple, "t"), (list, "l"), (set, "set"), (frozenset, "fs")):
    if isinstance(value, base):
      return [tag, [encode(x, d) for x in base.__iter__(value)]]
  raise TypeError(f"a value of type {type(value).__name__} is not plain data (allowed: None, "
                  f"bool, int, float, complex, str, bytes, list, tuple, dict, set)")


_SEQUENCES = {"t": tuple, "l": list, "set": set, "fs": frozenset}


def decode(obj, depth=0):
  """Inverse of ``encode`` for untrusted input: plain values only, ValueError/TypeError else."""
  if depth > MAX_DEPTH:
    raise ValueError(f"value nested deeper than {MAX_DEPTH}")
  if obj is None or obj is True or obj is False:
    return obj
  if type(obj) is not list or not obj or type(obj[0]) is not str:
    raise ValueError(f"not an encoded value: {str(obj)[:80]}")
  tag, args, d = obj[0], obj[1:], depth + 1
  if tag in ("i", "f", "s", "b", "ba") and (len(args) != 1 or type(args[0]) is not str):
    raise ValueError(f"bad {tag!r} value")
  if tag == "i":
    return int(args[0], 16)
  if tag == "f":
    return float.fromhex(args[0])
  if tag == "s":
    return args[0]
  if tag in ("b", "ba"):
    return (bytes if tag == "b" else bytearray).fromhex(args[0])
  if tag == "c" and len(args) == 2 and all(type(a) is str for a in args):
    return complex(float.fromhex(args[0]), float.fromhex(args[1]))
  if len(args) != 1 or type(args[0]) is not list:
    raise ValueError(f"bad {tag!r} value")
  items = args[0]
  if tag == "d":
    if not all(type(kv) is list and len(kv) == 2 for kv in items):
      raise ValueError("bad dict")
    pairs = [(decode(k, d), decode(x, d)) for k, x in items]
    few_collisions(k for k, _ in pairs)
    return dict(pairs)
  if tag in ("set", "fs"):
    return _SEQUENCES[tag](few_collisions(decode(x, d) for x in items))
  if tag in _SEQUENCES:
    return _SEQUENCES[tag](decode(x, d) for x in items)
  raise ValueError(f"unknown tag {tag!r}")


def read_channel(lines, pid, n_steps):
  """Host side: (values, error line or None, done) from the channel lines of the program's first
  process (``pid``, as its parent reported it); undecodable or out-of-order lines end the read."""
  import json  # pylint: disable=import-outside-toplevel
  values = []
  for raw in lines:
    try:
      msg = json.loads(raw)
    except (ValueError, RecursionError):
      continue  # not ours to judge: lines of forked children may be cut or interleaved
    if type(msg) is not dict or msg.get("pid") != pid or pid is None:
      continue
    if msg.get("done") is True:
      if len(values) == n_steps:
        return values, None, True
      return values, {"error": f"completion claimed after {len(values)} of {n_steps} steps"}, False
    if "error" in msg:
      return values, msg, False
    if msg.get("i") != len(values) or "value" not in msg:
      return values, {"error": "the channel is out of order"}, False
    try:
      values.append(decode(msg["value"]))
    except (ValueError, TypeError, RecursionError, OverflowError) as e:
      return values, {"error": f"step {len(values)}: undecodable value ({e})"}, False
  return values, None, False


def _writer(fd):
  def write(**fields):
    if fields == {"done": True}:  # json (and the re module it imports) only when there is data
      data = b'{"pid": %d, "done": true}\n' % os.getpid()
    else:
      import json  # pylint: disable=import-outside-toplevel
      data = (json.dumps(dict(pid=os.getpid(), **fields)) + "\n").encode()
    while data:
      data = data[os.write(fd, data):]
  return write


def _guard_network():
  """Refuses IP sockets at the socket module: a guard (``_socket`` and ctypes bypass it), used
  only where the kernel's socket filter is missing."""
  import socket  # pylint: disable=import-outside-toplevel

  class NoIPSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):  # pylint: disable=W0622
      if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
        raise PermissionError("sandbox: network access is disabled")
      super().__init__(family, type, proto, fileno)

  def no_network(*args, **kwargs):
    raise PermissionError("sandbox: network access is disabled")

  socket.socket = socket.SocketType = NoIPSocket
  socket.create_connection = socket.create_server = socket.getaddrinfo = no_network


def run():
  write = _writer(int(sys.argv[1]))
  if sys.argv[2:] != ["socket_filter"]:
    _guard_network()
  sys.argv = ["main.py"]
  steps = []
  if os.path.exists("steps.json"):
    import json  # pylint: disable=import-outside-toplevel
    with open("steps.json", encoding="utf-8") as f:
      steps = json.load(f)
  namespace = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
  index = None
  try:
    with open("main.py", encoding="utf-8") as f:
      exec(compile(f.read(), "main.py", "exec"), namespace)  # pylint: disable=exec-used
    for index, (kind, source) in enumerate(steps):
      code = compile(source, f"<test step {index}>", "exec" if kind == "exec" else "eval")
      value = eval(code, namespace)  # pylint: disable=eval-used
      write(i=index, value=encode(value))
  except BaseException as e:  # pylint: disable=broad-except
    if isinstance(e, SystemExit):
      raise  # an exit before the end is no completion; its code is the program's exit status
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    write(i=index, error=f"{type(e).__name__}: {e}"[:2000], type=type(e).__name__,
          errno=getattr(e, "errno", None) if isinstance(getattr(e, "errno", None), int) else None)
    sys.stderr.flush()
    os._exit(1)  # even if the program replaced os._exit: no "done" line was written
    return
  sys.stdout.flush()
  write(done=True)


if __name__ == "__main__":
  run()
