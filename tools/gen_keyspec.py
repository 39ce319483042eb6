#!/usr/bin/env python3
"""Generate ``src/keyspec/table.rs``, rb's static table of Redis key positions.

What it does
------------
The script asks a real Redis server for its ``COMMAND`` reply and writes that
reply out as a sorted Rust table (``COMMANDS: &[KeySpec]``). Each row holds:

* ``name``: the command name, lowercase. Subcommands get their own rows,
  named ``container|sub`` the way Redis 7 names them (``object|encoding``,
  ``config|get``).
* ``first``, ``last``, ``step``: the legacy key positions (elements 3, 4
  and 5 of a ``COMMAND`` entry). ``last`` may be negative and then counts
  from the end of the argument list (``-1`` is the last argument).
* ``movable``: whether the flags (element 2) contain ``movablekeys``, i.e.
  the legacy positions do not describe the keys (``EVAL``, ``ZUNIONSTORE``,
  ``XREAD``, ...).
* ``subcommands``: whether the entry has a non-empty subcommand list
  (element 9, new in Redis 7). For such container commands the key
  positions are on the ``container|sub`` rows, and the top-level row usually
  has ``first = 0``.

Rows are sorted by name in plain byte order, so the Rust side can use
``binary_search_by(|s| s.name.cmp(name))``. The output is deterministic:
the same server version always gives the same file byte for byte.

Why
---
rb (like the Python ``rb`` it ports, see ``rb/router.py`` and
``rb/_rediscommands.py``) routes a command to a node by its key. It finds the
key with the legacy ``first``/``last``/``step`` positions, and it refuses to
route commands flagged ``movablekeys``, because their keys can only be found by
parsing the arguments. Python rb carries a table captured years ago from an old
Redis (``COMMAND`` output, key_spec = (first, last, step) plus flags). This
script builds the same kind of table from a current server, so the Rust
table can be regenerated instead of edited by hand.

How to run
----------
From the repository root::

    python3 tools/gen_keyspec.py

It uses only the Python standard library. By default it starts a private
``redis-server`` (found on ``PATH``, or use ``--redis-server PATH``) that
listens only on a unix socket in a temporary directory and has persistence
turned off. It waits until the server answers ``PING`` (at most about 10 s),
sends ``INFO server`` and ``COMMAND``, and stops the server and deletes the
temporary directory afterwards, also when something fails.

Options:

* ``--socket PATH``: use an already running server on that unix socket
  instead of starting one. The server is only read from.
* ``--out PATH``: write somewhere else (default: ``src/keyspec/table.rs``
  under the repository root, i.e. the parent of ``tools/``).
* ``--check``: write nothing. Exit with status 1 if the file on disk differs
  from what would be generated (for CI).

Regenerating for a newer Redis
------------------------------
Install the newer ``redis-server`` (or point ``--redis-server`` /
``--socket`` at it) and run the script again. The version goes into the file
header and into ``REDIS_VERSION``. Review the diff: a command that changes
``first``/``last``/``step`` or gains ``movablekeys`` changes how rb routes
it. ``COMMAND`` replies from before Redis 7 have no subcommand element. Then
every row gets ``subcommands: false`` and the table has top-level rows only.

Output formatting
-----------------
Each row is on one line, 4-space indent, with trailing commas. By default
rustfmt would break every ``KeySpec { .. }`` literal onto seven lines
(``struct_lit_width`` is 18), so the table has ``#[rustfmt::skip]`` on it.
This keeps ``cargo fmt --check`` clean without a 3000-line file.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "src", "keyspec", "table.rs")

# Positions inside one COMMAND entry (Redis 7 layout; 0..=5 exist since 2.8.13).
NAME, ARITY, FLAGS, FIRST, LAST, STEP = 0, 1, 2, 3, 4, 5
SUBCOMMANDS = 9

STARTUP_TIMEOUT = 10.0  # seconds to wait for our own redis-server to answer
IO_TIMEOUT = 10.0  # seconds per socket operation


class RespError(Exception):
    """An error reply (``-ERR ...``) from the server, or a protocol problem."""


# --------------------------------------------------------------------------
# Minimal RESP2 client
# --------------------------------------------------------------------------


class RespConnection:
    """A very small RESP2 client over a unix socket.

    It handles the five RESP2 reply types: ``+`` simple string, ``-`` error,
    ``:`` integer, ``$`` bulk string (``$-1`` is nil) and ``*`` array
    (``*-1`` is nil). Strings are returned as ``bytes``.
    """

    def __init__(self, path, timeout=IO_TIMEOUT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.rfile = self.sock.makefile("rb")

    def close(self):
        try:
            self.rfile.close()
        finally:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def command(self, *args):
        """Send one command and return its parsed reply (raise on ``-ERR``)."""
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            if isinstance(arg, str):
                arg = arg.encode("utf-8")
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        self.sock.sendall(b"".join(parts))
        reply = self._read_reply()
        if isinstance(reply, RespError):
            raise reply
        return reply

    def _read_line(self):
        line = self.rfile.readline()
        if not line:
            raise RespError("connection closed by server")
        if not line.endswith(b"\r\n"):
            raise RespError("truncated line: %r" % line)
        return line[:-2]

    def _read_reply(self):
        line = self._read_line()
        if not line:
            raise RespError("empty reply line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            # Errors nested in arrays are returned as values, not raised.
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self.rfile.read(length + 2)
            if len(data) != length + 2 or not data.endswith(b"\r\n"):
                raise RespError("truncated bulk string")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self._read_reply() for _ in range(count)]
        raise RespError("unsupported RESP2 reply type %r" % kind)


# --------------------------------------------------------------------------
# Server management
# --------------------------------------------------------------------------


def _try_ping(path):
    try:
        with RespConnection(path, timeout=1.0) as conn:
            return conn.command("PING") == b"PONG"
    except (OSError, RespError):
        return False


class PrivateRedis:
    """A throw-away redis-server on a unix socket in a temporary directory."""

    def __init__(self, binary):
        self.binary = binary
        self.tmpdir = None
        self.proc = None
        self.log = None
        self.socket_path = None

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc):
        self._stop()

    def _start(self):
        self.tmpdir = tempfile.mkdtemp(prefix="gen_keyspec.")
        self.socket_path = os.path.join(self.tmpdir, "s.sock")
        log_path = os.path.join(self.tmpdir, "redis.log")
        self.log = open(log_path, "wb")
        argv = [
            self.binary,
            "--port", "0",
            "--unixsocket", self.socket_path,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self.tmpdir,
        ]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                cwd=self.tmpdir,
            )
        except OSError as e:
            raise SystemExit("gen_keyspec: cannot start %r: %s" % (self.binary, e))

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    "gen_keyspec: redis-server exited with status %s:\n%s"
                    % (self.proc.returncode, self._log_tail())
                )
            if os.path.exists(self.socket_path) and _try_ping(self.socket_path):
                return
            if time.monotonic() > deadline:
                raise SystemExit(
                    "gen_keyspec: redis-server did not answer PING within %gs:\n%s"
                    % (STARTUP_TIMEOUT, self._log_tail())
                )
            time.sleep(0.05)

    def _log_tail(self):
        try:
            self.log.flush()
            with open(os.path.join(self.tmpdir, "redis.log"), "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def _stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


# --------------------------------------------------------------------------
# COMMAND reply -> rows
# --------------------------------------------------------------------------


def _text(value, what):
    if not isinstance(value, bytes):
        raise RespError("expected a string for %s, got %r" % (what, value))
    return value.decode("ascii")


def _int(value, what):
    if not isinstance(value, int):
        raise RespError("expected an integer for %s, got %r" % (what, value))
    return value


def collect_rows(entries, out, parent=None):
    """Add one row per entry (and, recursively, per subcommand) to ``out``."""
    if not isinstance(entries, list):
        raise RespError("COMMAND reply is not an array: %r" % (entries,))
    for entry in entries:
        if not isinstance(entry, list) or len(entry) <= STEP:
            raise RespError("malformed COMMAND entry: %r" % (entry,))
        name = _text(entry[NAME], "command name").lower()
        if parent is not None and not name.startswith(parent + "|"):
            # Redis 7 already uses "container|sub"; be explicit if not.
            name = parent + "|" + name
        flags = entry[FLAGS] if isinstance(entry[FLAGS], list) else []
        flags = {_text(f, "flag").lower() for f in flags}
        subs = entry[SUBCOMMANDS] if len(entry) > SUBCOMMANDS else None
        subs = subs if isinstance(subs, list) else []
        if name in out:
            raise RespError("duplicate command name %r" % name)
        out[name] = {
            "name": name,
            "first": _int(entry[FIRST], name + " first"),
            "last": _int(entry[LAST], name + " last"),
            "step": _int(entry[STEP], name + " step"),
            "movable": "movablekeys" in flags,
            "subcommands": bool(subs),
        }
        collect_rows(subs, out, parent=name)
    return out


def redis_version(info):
    for line in info.decode("utf-8", "replace").splitlines():
        if line.startswith("redis_version:"):
            return line.split(":", 1)[1].strip()
    raise RespError("INFO server has no redis_version")


# --------------------------------------------------------------------------
# Rust rendering
# --------------------------------------------------------------------------


def rust_str(s):
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            raise ValueError("unexpected character %r in command name %r" % (ch, s))
    return '"' + "".join(out) + '"'


def rust_bool(b):
    return "true" if b else "false"


def render(version, rows):
    rows = sorted(rows, key=lambda r: r["name"].encode("ascii"))
    lines = [
        "// Generated by `tools/gen_keyspec.py` from `COMMAND` of Redis %s." % version,
        "// DO NOT EDIT: regenerate with `python3 tools/gen_keyspec.py`",
        "// (run from the repository root; see the script's docstring).",
        "",
        "use super::KeySpec;",
        "",
        "/// Redis version the table was generated from.",
        "pub(super) const REDIS_VERSION: &str = %s;" % rust_str(version),
        "",
        "/// Every command and subcommand, sorted by name (lowercase, subcommands as `container|sub`).",
        "#[rustfmt::skip]",
        "pub(super) static COMMANDS: &[KeySpec] = &[",
    ]
    for r in rows:
        lines.append(
            "    KeySpec { name: %s, first: %d, last: %d, step: %d, movable: %s, subcommands: %s },"
            % (
                rust_str(r["name"]),
                r["first"],
                r["last"],
                r["step"],
                rust_bool(r["movable"]),
                rust_bool(r["subcommands"]),
            )
        )
    lines.append("];")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def fetch(socket_path):
    with RespConnection(socket_path) as conn:
        version = redis_version(conn.command("INFO", "server"))
        rows = collect_rows(conn.command("COMMAND"), {})
    return version, list(rows.values())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Generate src/keyspec/table.rs from a Redis server's COMMAND reply."
    )
    parser.add_argument(
        "--socket", metavar="PATH",
        help="use an already running redis-server on this unix socket",
    )
    parser.add_argument(
        "--redis-server", metavar="BIN", default="redis-server",
        help="redis-server binary to start (default: redis-server on PATH)",
    )
    parser.add_argument(
        "--out", metavar="PATH", default=DEFAULT_OUT,
        help="output file (default: %(default)s)",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="do not write; exit 1 if --out differs from the generated text",
    )
    args = parser.parse_args(argv)

    if args.socket:
        version, rows = fetch(args.socket)
    else:
        with PrivateRedis(args.redis_server) as server:
            version, rows = fetch(server.socket_path)

    text = render(version, rows)
    summary = "%d rows (%d with subcommands, %d movable) from Redis %s" % (
        len(rows),
        sum(r["subcommands"] for r in rows),
        sum(r["movable"] for r in rows),
        version,
    )

    if args.check:
        try:
            with open(args.out, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print("gen_keyspec: %s is out of date (%s)" % (args.out, summary), file=sys.stderr)
            return 1
        print("gen_keyspec: %s is up to date (%s)" % (args.out, summary), file=sys.stderr)
        return 0

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print("gen_keyspec: wrote %s: %s" % (args.out, summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
