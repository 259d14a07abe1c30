/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Shared definitions of the socket redirection programs: the sockhash key,
 * the counter indices, the per-connection state and the run-time settings.
 * The maps themselves are declared once per loader: sockredir_bcc.h (BCC
 * compiles on the host) and sockredir_libbpf.h (clang builds an object once,
 * libbpf loads it); both give the program body the same accessors.
 *
 * The key is the contract between the two programs: sockredir_ops inserts a
 * socket under its own key, sockredir_msg looks up the peer under the mirrored
 * key. Both must build it the same way, so the layout and the byte order of
 * every field are fixed here.
 *
 *   SOCKREDIR_MAP_SIZE  max entries of the sockhash and the per-connection
 *                       maps (default 65535; the object loader may resize)
 */
#ifndef __SOCKREDIR_H
#define __SOCKREDIR_H

#include <linux/types.h>

#ifndef SOCKREDIR_MAP_SIZE
#define SOCKREDIR_MAP_SIZE 65535
#endif

_Static_assert(SOCKREDIR_MAP_SIZE > 0, "SOCKREDIR_MAP_SIZE must be positive");

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/*
 * One TCP endpoint, seen from the socket that owns it.
 *
 * local_ip, remote_ip: 16 bytes in network byte order, as the kernel exposes
 *   local_ip6/remote_ip6. IPv4 is stored IPv4-mapped (::ffff:a.b.c.d): an
 *   AF_INET client and the AF_INET6 socket a "::" listener accepts for it
 *   see the same addresses, and so produce mirrored keys.
 * local_port, remote_port: host byte order. The context structs disagree
 *   (see sockredir_local_port() and sockredir_remote_port()), so both are
 *   normalised before they go into a key.
 * netns_cookie: bpf_get_netns_cookie() of the socket. The same 4-tuple can
 *   exist in several network namespaces at once (containers all talking to
 *   127.0.0.1:8080); without the cookie their sockets would overwrite each
 *   other in the map and data would be redirected across namespaces.
 *
 * No implicit padding: the whole struct is hashed, so a hole with stack
 * garbage would make equal keys differ.
 */
struct sockredir_key {
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u32 local_port;
	__u32 remote_port;
	__u64 netns_cookie;
};

_Static_assert(sizeof(struct sockredir_key) == 48,
	       "struct sockredir_key must be 48 bytes without padding");
_Static_assert(__builtin_offsetof(struct sockredir_key, netns_cookie) == 40,
	       "struct sockredir_key: netns_cookie must follow the ports");

/*
 * Indices of sockredir_stats. A contract with user space
 * (COUNTERS in plugins/module_utils/facts.py): append, never renumber.
 */
enum sockredir_stat {
	SOCKREDIR_STAT_REDIRECTED_MSGS = 0,
	SOCKREDIR_STAT_REDIRECTED_BYTES = 1,
	SOCKREDIR_STAT_PASSED_MSGS = 2,
	SOCKREDIR_STAT_PASSED_BYTES = 3,
	/* admitted: put in the sockhash */
	SOCKREDIR_STAT_INSERTED = 4,
	/* sock_hash_update() failed with -E2BIG: the sockhash is full */
	SOCKREDIR_STAT_INSERT_FULL = 5,
	/* sock_hash_update() or the flow state insert failed otherwise */
	SOCKREDIR_STAT_INSERT_FAILED = 6,
	/* not admitted: the peer is not a socket of ours in this netns */
	SOCKREDIR_STAT_NOT_ADMITTED_PEER = 7,
	/* not admitted: bytes crossed TCP before ESTABLISHED (Fast Open) */
	SOCKREDIR_STAT_NOT_ADMITTED_EARLY_DATA = 8,
	/* a direction switched to TCP after a streak of small writes */
	SOCKREDIR_STAT_DEMOTED_SMALL_WRITES = 9,
	/* a direction switched to TCP: its peer was not (or no longer) there */
	SOCKREDIR_STAT_TCP_PEER_ABSENT = 10,
	/* a socket that sends over TCP was taken out of the sockhash */
	SOCKREDIR_STAT_REMOVED = 11,
	/* a small-write streak stayed redirected: redirected bytes may
	 * still wait in the socket's queue, so it cannot leave the map */
	SOCKREDIR_STAT_DEMOTION_REFUSED = 12,
	/* not admitted: the port policy (sockredir_ports) excludes it */
	SOCKREDIR_STAT_NOT_ADMITTED_POLICY = 13,
	SOCKREDIR_STAT_MAX = 14,
};

/*
 * Path state of a connection, in sockredir_flows under its connection key
 * (sockredir_flow_key(): the endpoint that sorts first is side 0), one
 * slot per direction, indexed by the sending socket's side: one lookup per
 * send serves both the sender's state and the reset of its peer's streak.
 * A side's slot is written by that socket's own sk_msg (under its socket
 * lock) and sock_ops callbacks; the peer only clears small_streak.
 */
#define SOCKREDIR_FLOW_ADMITTED		(1U << 0)	/* the socket is in the sockhash */
#define SOCKREDIR_FLOW_TCP		(1U << 1)	/* its sends go TCP, for good */
#define SOCKREDIR_FLOW_REMOVE		(1U << 2)	/* leave the sockhash at the next ACK */
#define SOCKREDIR_FLOW_PEER_GATE_OPEN	(1U << 3)	/* the peer's receive gate is open to us */
#define SOCKREDIR_FLOW_KEEP		(1U << 4)	/* cannot leave the map: never demote */
#define SOCKREDIR_FLOW_TCP_SEEN		(1U << 5)	/* its own sk_msg has sent over TCP since: none of its redirects is in flight */

struct sockredir_flow {
	__u32 flags[2];
	/* sends below small_bytes in a row, with nothing received between */
	__u32 small_streak[2];
};

/*
 * The receive gate of a socket, in sockredir_gates under its own key, set
 * once and for good by whichever comes first (BPF_NOEXIST insert, atomic
 * under the hash bucket lock):
 *   OPEN    the peer redirected into it: its ingress queue may hold bytes,
 *           so it must stay in the sockhash (deleting would drop them);
 *   CLOSED  it is leaving the map: the peer must send over TCP.
 */
#define SOCKREDIR_GATE_OPEN	1
#define SOCKREDIR_GATE_CLOSED	2

/*
 * Run-time settings, sockredir_cfg[0]; a zero field means the default.
 */
struct sockredir_settings {
	/* a send smaller than this counts towards a small-write streak */
	__u32 small_bytes;
	/* that many small sends in a row, nothing received: go TCP */
	__u32 small_streak;
	__u32 flags;		/* SOCKREDIR_SET_* */
	/* names this instance in debug events (the loader's choice) */
	__u32 instance;
};

/* only connections with a port listed SOCKREDIR_PORT_ALLOW are admitted */
#define SOCKREDIR_SET_ALLOW_LISTED	(1U << 0)
/* one trace_pipe line per admission and per path decision */
#define SOCKREDIR_SET_DEBUG		(1U << 1)

/*
 * sockredir_ports: port (host byte order) -> verdict. A connection whose
 * local or remote port is DENY is never admitted (deny wins); with
 * SOCKREDIR_SET_ALLOW_LISTED, only one with an ALLOW port is. Both ends of a
 * connection see the same two ports, so they decide alike.
 */
#define SOCKREDIR_PORT_ALLOW	1
#define SOCKREDIR_PORT_DENY	2
#define SOCKREDIR_MAX_PORTS	1024

#ifndef SOCKREDIR_SMALL_BYTES
#define SOCKREDIR_SMALL_BYTES 0xffffffffU
#endif
#ifndef SOCKREDIR_SMALL_STREAK
#define SOCKREDIR_SMALL_STREAK 16
#endif

#endif /* __SOCKREDIR_H */
