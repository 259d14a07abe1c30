"""Throwaway kernel environments for real-traffic tests (run as root).

    with child_cgroup("sockredir-test") as cg, netns("sockredir-test") as ns:
        # attach sock_ops to cg ...
        before = lo_packets(ns)
        result = transfer(cg, ns, "::", "127.0.0.1", 0, 64 << 20, seed=1)
        assert result["sent_sha256"] == result["recv_sha256"]
        lo_rx = lo_packets(ns) - before

child_cgroup(prefix)  a new cgroup v2 directory <prefix>-<random8> under the
                      cgroup2 mount; on exit every process left in it is
                      killed and the directory removed.
netns(prefix)         a new named network namespace <prefix>-<random8> with
                      lo up (127.0.0.1 and ::1); on exit processes left in it
                      are killed and it is deleted.
lo_packets(ns)        rx packet counter of lo in that namespace.
transfer(...)         one TCP transfer between two peer.py processes placed
                      in a cgroup and a namespace; returns the hashes and
                      byte counts both sides saw.

Namespaces are driven with the `ip` command (iproute2), not pyroute2, so
nothing beyond the standard library is needed. Names are random per call:
leftovers of a crashed run never collide with the next one.
"""

import contextlib
import errno
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer.py")
PEER_PYTHON = "/usr/bin/python3"

# Pass as server_cgroup / client_cgroup to leave that side in the caller's
# cgroup (outside any child cgroup), e.g. for mixed accelerated/plain tests.
NO_CGROUP = ""

_POLL = 0.02


def unique_name(prefix):
    return "%s-%s" % (prefix, secrets.token_hex(4))


def cgroup2_mount():
    """Mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            # Optional fields end at "-", followed by fstype and source.
            fstype = fields[fields.index("-") + 1]
            if fstype == "cgroup2":
                # Spaces and the like are octal-escaped in mount points.
                return fields[4].encode().decode("unicode_escape")
    raise RuntimeError("no cgroup2 hierarchy in /proc/self/mountinfo")


def _wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(_POLL)


def _cgroup_pids(path):
    with open(os.path.join(path, "cgroup.procs")) as procs:
        return [int(pid) for pid in procs.read().split()]


def _kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_cgroup(path, timeout=10.0):
    """Kill every process in the child cgroup `path` and wait until it is empty."""
    root = os.path.realpath(cgroup2_mount())
    if os.path.realpath(path) == root:
        raise ValueError("refusing to kill the root cgroup %s" % path)
    kill_file = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill_file):
        with open(kill_file, "w") as kill:
            kill.write("1")
    else:
        _kill_pids(_cgroup_pids(path))

    def empty():
        # Without cgroup.kill new children may have been forked meanwhile.
        pids = _cgroup_pids(path)
        _kill_pids(pids)
        return not pids

    _wait_until(empty, timeout, "cgroup %s to empty" % path)


@contextlib.contextmanager
def child_cgroup(prefix):
    """Yield the path of a new cgroup v2 directory; empty and remove it on exit."""
    path = os.path.join(cgroup2_mount(), unique_name(prefix))

    def removed():
        try:
            os.rmdir(path)
        except OSError as err:
            # EBUSY while the last exiting task is still being released.
            if err.errno == errno.EBUSY:
                return False
            raise
        return True

    os.mkdir(path)
    try:
        yield path
    finally:
        kill_cgroup(path)
        _wait_until(removed, 10.0, "rmdir %s" % path)


def _ip(*args, capture=False):
    result = subprocess.run(
        ("ip",) + args, check=True, text=True,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return result.stdout


def netns_pids(name):
    return [int(pid) for pid in _ip("netns", "pids", name, capture=True).split()]


def _lo_addresses(name):
    links = json.loads(_ip("-n", name, "-j", "addr", "show", "dev", "lo", capture=True))
    return {info["local"] for link in links for info in link.get("addr_info", [])}


@contextlib.contextmanager
def netns(prefix):
    """Yield the name of a new network namespace with lo up; delete it on exit."""
    name = unique_name(prefix)

    def empty():
        pids = netns_pids(name)
        _kill_pids(pids)
        return not pids

    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "dev", "lo", "up")
        _wait_until(lambda: {"127.0.0.1", "::1"} <= _lo_addresses(name), 5.0,
                    "127.0.0.1 and ::1 on lo in %s" % name)
        yield name
    finally:
        _wait_until(empty, 10.0, "processes in netns %s to exit" % name)
        _ip("netns", "delete", name)


@contextlib.contextmanager
def veth_link(ns_a, ns_b, subnet="10.231.%d.%d/24"):
    """A veth pair between two namespaces, as another host on a LAN would be.

    Yields (address in ns_a, address in ns_b); the pair goes with either
    namespace, and is deleted on exit in case neither went.
    """
    name = unique_name("srv")[:15]
    third = int(name.rsplit("-", 1)[1][:2], 16)
    addr_a, addr_b = subnet % (third, 1), subnet % (third, 2)
    _ip("link", "add", name, "netns", ns_a, "type", "veth", "peer", "name", name, "netns", ns_b)
    try:
        for ns, addr in ((ns_a, addr_a), (ns_b, addr_b)):
            _ip("-n", ns, "addr", "add", addr, "dev", name)
            _ip("-n", ns, "link", "set", "dev", name, "up")
        yield addr_a.split("/")[0], addr_b.split("/")[0]
    finally:
        subprocess.run(("ip", "-n", ns_a, "link", "delete", name),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def lo_packets(netns_name):
    """Packets received on lo in the namespace (loopback traffic, both directions)."""
    links = json.loads(_ip("-n", netns_name, "-j", "-s", "link", "show", "dev", "lo",
                           capture=True))
    return links[0]["stats64"]["rx"]["packets"]


def _peer_command(cgroup, netns_name, args):
    command = ["nsenter", "--net=/run/netns/%s" % netns_name, PEER_PYTHON, PEER] + args
    if not cgroup:
        return command
    # The shell joins the cgroup, then exec()s: same pid, so nsenter, python
    # and every socket it creates belong to the cgroup from the start.
    # (Thread-safe, unlike a preexec_fn.)
    return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"',
            os.path.join(cgroup, "cgroup.procs")] + command


def _spawn(cgroup, netns_name, args):
    # Unbuffered: _read_line() must not pull more than the first line into a
    # Python buffer that communicate() would then never see.
    return subprocess.Popen(_peer_command(cgroup, netns_name, args), bufsize=0,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _read_line(proc, deadline):
    """One stdout line of proc, or None if it exits or the deadline passes first."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not selector.select(remaining):
            return None
    # The peer writes whole lines with flush, so this does not block.
    return proc.stdout.readline() or None


def _finish(proc, role, deadline):
    remaining = max(0.0, deadline - time.monotonic())
    try:
        out, err = proc.communicate(timeout=remaining)
    except subprocess.TimeoutExpired:
        raise TimeoutError("%s peer did not finish in time" % role) from None
    if proc.returncode != 0:
        raise RuntimeError("%s peer failed (exit %s): %s"
                           % (role, proc.returncode, err.decode(errors="replace").strip()))
    return json.loads(out.decode().strip().splitlines()[-1])


def transfer(cgroup, netns, server_bind, client_connect, port, nbytes, seed,
             timeout=60, server_cgroup=None, client_cgroup=None, client_port=0):
    """Send nbytes from a client to a server in namespace `netns`; return what both saw.

    cgroup is the child cgroup both peers join; server_cgroup/client_cgroup
    override it per side (None: use `cgroup`; NO_CGROUP: stay in the
    caller's cgroup). port 0 lets the server pick a free port; client_port
    fixes the client's source port (identical 4-tuples in two namespaces
    need it). Raises TimeoutError when the whole transfer takes longer than
    timeout seconds, RuntimeError when a peer fails. Both processes are
    always reaped.
    """
    deadline = time.monotonic() + timeout
    server_cg = cgroup if server_cgroup is None else server_cgroup
    client_cg = cgroup if client_cgroup is None else client_cgroup
    procs = []
    try:
        server = _spawn(server_cg, netns, [
            "server", "--bind", server_bind, "--port", str(port),
            "--timeout", str(timeout)])
        procs.append(server)
        line = _read_line(server, deadline)
        if line is None:
            server.kill()
            err = server.communicate()[1].decode(errors="replace").strip()
            raise RuntimeError("server peer never listened on [%s]:%s: %s"
                               % (server_bind, port, err))
        listening = json.loads(line)["listening"]

        client = _spawn(client_cg, netns, [
            "client", "--connect", client_connect, "--port", str(listening),
            "--bytes", str(nbytes), "--seed", str(seed),
            "--source-port", str(client_port), "--timeout", str(timeout)])
        procs.append(client)
        sent = _finish(client, "client", deadline)
        received = _finish(server, "server", deadline)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return {
        "sent_sha256": sent["sent_sha256"],
        "recv_sha256": received["recv_sha256"],
        "sent_bytes": sent["sent_bytes"],
        "recv_bytes": received["recv_bytes"],
    }


if __name__ == "__main__":
    # Smoke test without any BPF: one IPv4 transfer in a fresh namespace.
    with child_cgroup("hostenv-smoke") as cg, netns("hostenv-smoke") as ns:
        print(json.dumps(transfer(cg, ns, "127.0.0.1", "127.0.0.1", 0, 1 << 20, 1)))
        print("lo rx packets:", lo_packets(ns))
    sys.exit(0)
