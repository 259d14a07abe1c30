// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Same-host TCP acceleration by socket redirection.
 *
 * sockredir_ops (sock_ops, attached to a cgroup) admits an established
 * IPv4/IPv6 TCP socket into the sockhash, keyed by its own endpoint, only
 * when its peer is a socket of this host, in the same netns, under these
 * programs. sockredir_msg (sk_msg, attached to the sockhash) runs on every
 * sendmsg() of those sockets, looks the peer socket up by the mirrored key
 * and queues the data straight onto the peer's receive queue: no TCP/IP
 * stack, no loopback device.
 *
 * Each direction of a flow takes one of two paths, and may switch only
 * from redirect to TCP, never back (docs/design.md has the diagram): the
 * receiver reads its redirected queue before its TCP queue, so bytes that
 * went TCP first would be read after later redirected ones.
 *
 * Port policy at run time: the sockredir_ports map and the allow-listed
 * flag of sockredir_cfg (sockredir.h), written by the loader; changing them
 * reloads nothing. A BCC build may also compile lists in:
 *   -DSOCKREDIR_ALLOW_PORTS=80,443  only connections whose local or remote
 *                                   port is listed are accelerated
 *   -DSOCKREDIR_DENY_PORTS=22       connections touching a listed port never
 *                                   are (deny wins over allow)
 * Both ends of a connection share the same two ports, so the policy decides
 * the same way for both sockets: either both are in the map or neither is.
 */
/*
 * BCC prepends its helpers.h, which defines BPF_TABLE; the object build
 * (clang -target bpf) has libbpf's headers instead.
 */
#ifdef BPF_TABLE
#include "sockredir_bcc.h"

/*
 * The map accessors for BCC, which rewrites map method calls only in the
 * main file (and never inside macros); sockredir_libbpf.h has the same set.
 */
static __always_inline __u64 *sockredir_stat_slot(__u32 stat)
{
	return sockredir_stats.lookup(&stat);
}

static __always_inline struct sockredir_flow *sockredir_flow_get(struct sockredir_key *conn)
{
	return sockredir_flows.lookup(conn);
}

static __always_inline long sockredir_flow_put(struct sockredir_key *conn,
					       struct sockredir_flow *flow, __u64 flags)
{
	return flags == BPF_NOEXIST ? sockredir_flows.insert(conn, flow) :
				      sockredir_flows.update(conn, flow);
}

static __always_inline void sockredir_flow_forget(struct sockredir_key *conn)
{
	sockredir_flows.delete(conn);
}

static __always_inline __u32 *sockredir_gate_get(struct sockredir_key *key)
{
	return sockredir_gates.lookup(key);
}

/* BPF_NOEXIST: 0 when this call set the gate, an error when it was set */
static __always_inline long sockredir_gate_set(struct sockredir_key *key, __u32 *gate)
{
	return sockredir_gates.insert(key, gate);
}

static __always_inline void sockredir_gate_forget(struct sockredir_key *key)
{
	sockredir_gates.delete(key);
}

static __always_inline int sockredir_req_seen(struct sockredir_key *key)
{
	return sockredir_reqs.lookup(key) != 0;
}

static __always_inline void sockredir_req_note(struct sockredir_key *key)
{
	__u32 one = 1;

	sockredir_reqs.update(key, &one);
}

static __always_inline void sockredir_req_forget(struct sockredir_key *key)
{
	sockredir_reqs.delete(key);
}

static __always_inline struct sockredir_settings *sockredir_settings_get(void)
{
	__u32 zero = 0;

	return sockredir_cfg.lookup(&zero);
}

static __always_inline long sockredir_sock_insert(struct bpf_sock_ops *skops,
						  struct sockredir_key *key)
{
	return sockredir_hash.sock_hash_update(skops, key, BPF_ANY);
}

static __always_inline long sockredir_sock_remove(struct sockredir_key *key)
{
	return sockredir_hash.delete(key);
}

static __always_inline int sockredir_redirect(struct sk_msg_md *msg, struct sockredir_key *peer)
{
	return sockredir_hash.msg_redirect_hash(msg, peer, BPF_F_INGRESS);
}

static __always_inline __u32 sockredir_port_verdict(__u32 port)
{
	__u32 *verdict = sockredir_ports.lookup(&port);

	return verdict ? *verdict : 0;
}

/* One trace_pipe line per decision; the same text as sockredir_libbpf.h's. */
static __always_inline void sockredir_trace(__u32 stat, __u32 instance, const struct sockredir_key *key)
{
	__u32 l = key->local_port, r = key->remote_port;

	switch (stat) {
	case SOCKREDIR_STAT_INSERTED:
		bpf_trace_printk("sockredir %x %u>%u admitted\n", instance, l, r); break;
	case SOCKREDIR_STAT_INSERT_FULL:
		bpf_trace_printk("sockredir %x %u>%u not admitted: sockhash full\n", instance, l, r); break;
	case SOCKREDIR_STAT_INSERT_FAILED:
		bpf_trace_printk("sockredir %x %u>%u not admitted: insert failed\n", instance, l, r); break;
	case SOCKREDIR_STAT_NOT_ADMITTED_PEER:
		bpf_trace_printk("sockredir %x %u>%u not admitted: peer not ours\n", instance, l, r); break;
	case SOCKREDIR_STAT_NOT_ADMITTED_EARLY_DATA:
		bpf_trace_printk("sockredir %x %u>%u not admitted: data before established\n", instance, l, r); break;
	case SOCKREDIR_STAT_NOT_ADMITTED_POLICY:
		bpf_trace_printk("sockredir %x %u>%u not admitted: port policy\n", instance, l, r); break;
	case SOCKREDIR_STAT_DEMOTED_SMALL_WRITES:
		bpf_trace_printk("sockredir %x %u>%u to tcp: small writes\n", instance, l, r); break;
	case SOCKREDIR_STAT_TCP_PEER_ABSENT:
		bpf_trace_printk("sockredir %x %u>%u to tcp: peer absent\n", instance, l, r); break;
	case SOCKREDIR_STAT_REMOVED:
		bpf_trace_printk("sockredir %x %u>%u left the sockhash\n", instance, l, r); break;
	case SOCKREDIR_STAT_DEMOTION_REFUSED:
		bpf_trace_printk("sockredir %x %u>%u small writes stay redirected\n", instance, l, r); break;
	}
}
#else
#include "sockredir_libbpf.h"
#endif

#ifndef E2BIG
#define E2BIG 7
#endif

/* A list is matched by a fully unrolled loop: keep the program small. */
#define SOCKREDIR_MAX_POLICY_PORTS 64

#define SOCKREDIR_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

static __always_inline void sockredir_count(__u32 stat, __u64 n)
{
	__u64 *val = sockredir_stat_slot(stat);

	/*
	 * Per-CPU, yet still atomic: these programs run with migration
	 * disabled but may be preempted, and another task's sendmsg on the
	 * same CPU would otherwise lose an update.
	 */
	if (val)
		__sync_fetch_and_add(val, n);
}

/* A path decision: counted, and traced when SOCKREDIR_SET_DEBUG is on. */
static __always_inline void sockredir_decided(__u32 stat, const struct sockredir_key *key)
{
	struct sockredir_settings *cfg = sockredir_settings_get();

	sockredir_count(stat, 1);
	if (cfg && (cfg->flags & SOCKREDIR_SET_DEBUG))
		sockredir_trace(stat, cfg->instance, key);
}

static __always_inline void sockredir_ip4_mapped(__u32 ip[4], __u32 ip4)
{
	/* ::ffff:a.b.c.d, what a dual-stack AF_INET6 socket reports */
	ip[0] = 0;
	ip[1] = 0;
	ip[2] = bpf_htonl(0x0000ffff);
	ip[3] = ip4;
}

/*
 * The context's ip6 arrays may only be read 4 bytes at a time; clang likes
 * to merge two neighbouring reads into one 8-byte load, which the verifier
 * rejects ("invalid bpf_context access"). Volatile reads stay separate.
 */
static __always_inline void sockredir_ip6_copy(__u32 dst[4], const __u32 *ctx_ip6)
{
	const volatile __u32 *src = ctx_ip6;

	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

/*
 * Ports as bpf_sock_ops and sk_msg_md expose them (the context rewrite in
 * net/core/filter.c, the same for both since they exist; checked on 6.18
 * against getsockname()/getpeername()):
 *   local_port:  host byte order (the socket's skc_num);
 *   remote_port: the network-order __be16 skc_dport in the upper 16 bits
 *                of the 32-bit field (shifted left by 16 on little-endian
 *                hosts, so in memory it is 00 00 hi lo), hence bpf_ntohl()
 *                of the whole field is the port in host byte order on
 *                either byte order. Read whole: some kernels reject a
 *                16-bit read of it.
 */
static __always_inline __u32 sockredir_remote_port(__u32 field)
{
	return bpf_ntohl(field);
}

static __always_inline int sockredir_ops_key(struct bpf_sock_ops *skops,
					     struct sockredir_key *key)
{
	switch (skops->family) {
	case AF_INET:
		sockredir_ip4_mapped(key->local_ip, skops->local_ip4);
		sockredir_ip4_mapped(key->remote_ip, skops->remote_ip4);
		break;
	case AF_INET6:
		sockredir_ip6_copy(key->local_ip, skops->local_ip6);
		sockredir_ip6_copy(key->remote_ip, skops->remote_ip6);
		break;
	default:
		return -1;
	}
	key->local_port = skops->local_port;
	key->remote_port = sockredir_remote_port(skops->remote_port);
	key->netns_cookie = bpf_get_netns_cookie(skops);
	return 0;
}

/*
 * The key the peer socket was inserted under: local and remote swapped.
 * Same network namespace: a redirect never crosses one.
 */
static __always_inline int sockredir_msg_peer_key(struct sk_msg_md *msg,
						  struct sockredir_key *key)
{
	switch (msg->family) {
	case AF_INET:
		sockredir_ip4_mapped(key->local_ip, msg->remote_ip4);
		sockredir_ip4_mapped(key->remote_ip, msg->local_ip4);
		break;
	case AF_INET6:
		sockredir_ip6_copy(key->local_ip, msg->remote_ip6);
		sockredir_ip6_copy(key->remote_ip, msg->local_ip6);
		break;
	default:
		return -1;
	}
	key->local_port = sockredir_remote_port(msg->remote_port);
	key->remote_port = msg->local_port;
	key->netns_cookie = bpf_get_netns_cookie(msg);
	return 0;
}

#if defined(SOCKREDIR_ALLOW_PORTS) || defined(SOCKREDIR_DENY_PORTS)
/*
 * Called with a constant n only, so the loop unrolls into n compares with
 * immediates. Were the list read by index at run time it would live in
 * .rodata, which BCC does not relocate (the load fails the verifier).
 */
static __always_inline int sockredir_port_listed(const __u32 *ports, __u32 n,
						 const struct sockredir_key *key)
{
#pragma unroll
	for (__u32 i = 0; i < n; i++) {
		if (ports[i] == key->local_port || ports[i] == key->remote_port)
			return 1;
	}
	return 0;
}
#endif

static __always_inline int sockredir_policy_allows(const struct sockredir_key *key)
{
	struct sockredir_settings *cfg = sockredir_settings_get();
	__u32 local = sockredir_port_verdict(key->local_port);
	__u32 remote = sockredir_port_verdict(key->remote_port);

#ifdef SOCKREDIR_DENY_PORTS
	const __u32 deny[] = { SOCKREDIR_DENY_PORTS };

	_Static_assert(SOCKREDIR_ARRAY_SIZE(deny) <= SOCKREDIR_MAX_POLICY_PORTS,
		       "SOCKREDIR_DENY_PORTS: too many ports");
	if (sockredir_port_listed(deny, SOCKREDIR_ARRAY_SIZE(deny), key))
		return 0;
#endif
#ifdef SOCKREDIR_ALLOW_PORTS
	const __u32 allow[] = { SOCKREDIR_ALLOW_PORTS };

	_Static_assert(SOCKREDIR_ARRAY_SIZE(allow) <= SOCKREDIR_MAX_POLICY_PORTS,
		       "SOCKREDIR_ALLOW_PORTS: too many ports");
	if (!sockredir_port_listed(allow, SOCKREDIR_ARRAY_SIZE(allow), key))
		return 0;
#endif
	if (local == SOCKREDIR_PORT_DENY || remote == SOCKREDIR_PORT_DENY)
		return 0;
	if (cfg && (cfg->flags & SOCKREDIR_SET_ALLOW_LISTED))
		return local == SOCKREDIR_PORT_ALLOW || remote == SOCKREDIR_PORT_ALLOW;
	return 1;
}

/* The key the peer socket has: local and remote swapped. */
static __always_inline void sockredir_mirror(const struct sockredir_key *own,
					     struct sockredir_key *peer)
{
	__builtin_memcpy(peer->local_ip, own->remote_ip, sizeof(peer->local_ip));
	__builtin_memcpy(peer->remote_ip, own->local_ip, sizeof(peer->remote_ip));
	peer->local_port = own->remote_port;
	peer->remote_port = own->local_port;
	peer->netns_cookie = own->netns_cookie;
}

/*
 * The connection's key, the same from both sockets: the endpoint (address,
 * then port) that sorts first is local. Returns the caller's side (0: its
 * own endpoint sorts first).
 */
static __always_inline int sockredir_flow_key(const struct sockredir_key *own,
					      struct sockredir_key *conn)
{
	int side = 0;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (own->local_ip[i] != own->remote_ip[i]) {
			side = own->local_ip[i] > own->remote_ip[i];
			goto decided;
		}
	}
	side = own->local_port > own->remote_port;
decided:
	if (side)
		sockredir_mirror(own, conn);
	else
		__builtin_memcpy(conn, own, sizeof(*conn));
	return side;
}

static __always_inline int sockredir_passive_request(struct bpf_sock_ops *skops)
{
	/* a listener's request (or a Fast Open child), not a connect()ing socket */
	return skops->state == BPF_TCP_NEW_SYN_RECV || skops->state == BPF_TCP_SYN_RECV;
}

/*
 * A listener of ours got a SYN: remember the request under the listener
 * side's key. Runs for the listener's cgroup, before the SYN-ACK leaves.
 */
static __always_inline void sockredir_note_request(struct bpf_sock_ops *skops)
{
	struct sockredir_key key = {};

	if (!sockredir_passive_request(skops) || sockredir_ops_key(skops, &key))
		return;
	if (sockredir_policy_allows(&key))
		sockredir_req_note(&key);
}

/*
 * Admission, at ESTABLISHED. The connect()ing side is established first
 * (on the SYN-ACK), when the listener's request is already noted: its
 * peer is ours iff that note exists. The accept()ed side is established
 * on the ACK: it is admitted iff the connecting side was. No byte may
 * have crossed TCP yet (Fast Open data in the SYN, a data segment that
 * completed the handshake): such a flow stays TCP, both sides.
 */
static __always_inline int sockredir_admissible(struct bpf_sock_ops *skops,
						struct sockredir_key *key,
						struct sockredir_key *conn, int side)
{
	struct sockredir_key peer = {};
	struct sockredir_flow *flow;

	if (skops->data_segs_out || skops->data_segs_in || skops->bytes_received) {
		sockredir_decided(SOCKREDIR_STAT_NOT_ADMITTED_EARLY_DATA, key);
		return 0;
	}
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		sockredir_mirror(key, &peer);
		if (!sockredir_req_seen(&peer))
			goto not_ours;
		return 1;
	}
	sockredir_req_forget(key);
	flow = sockredir_flow_get(conn);
	if (!flow || !(flow->flags[side ^ 1] & SOCKREDIR_FLOW_ADMITTED))
		goto not_ours;
	return 1;
not_ours:
	sockredir_decided(SOCKREDIR_STAT_NOT_ADMITTED_PEER, key);
	return 0;
}

static __always_inline void sockredir_admit(struct bpf_sock_ops *skops,
					    struct sockredir_key *key)
{
	struct sockredir_key conn = {};
	struct sockredir_flow fresh = {}, *flow;
	int side = sockredir_flow_key(key, &conn);
	long err;

	if (!sockredir_policy_allows(key)) {
		sockredir_decided(SOCKREDIR_STAT_NOT_ADMITTED_POLICY, key);
		return;
	}
	if (!sockredir_admissible(skops, key, &conn, side))
		return;
	/* a stale gate of an earlier socket with the same key must not count */
	sockredir_gate_forget(key);
	/* the connecting side is first: it starts the connection's entry */
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    sockredir_flow_put(&conn, &fresh, BPF_ANY)) {
		sockredir_decided(SOCKREDIR_STAT_INSERT_FAILED, key);
		return;
	}
	flow = sockredir_flow_get(&conn);
	if (!flow) {
		sockredir_decided(SOCKREDIR_STAT_INSERT_FAILED, key);
		return;
	}
	err = sockredir_sock_insert(skops, key);
	if (err) {
		/*
		 * The entry the connecting side started would stay without
		 * a STATE callback to remove it: a full sockhash would fill
		 * the flow map with dead entries. The accept()ing side
		 * finds none and is not admitted either.
		 */
		if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
			sockredir_flow_forget(&conn);
		sockredir_decided(err == -E2BIG ? SOCKREDIR_STAT_INSERT_FULL :
				  SOCKREDIR_STAT_INSERT_FAILED, key);
		return;
	}
	flow->flags[side & 1] |= SOCKREDIR_FLOW_ADMITTED;
	sockredir_decided(SOCKREDIR_STAT_INSERTED, key);
	/*
	 * STATE: forget the flow at close. RTT: runs on ACKs only, which a
	 * redirected socket never gets; once it sends over TCP, the first
	 * ACK is where it can leave the map (sk_msg may not delete).
	 */
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG |
				  BPF_SOCK_OPS_RTT_CB_FLAG);
}

/*
 * Switch this direction to TCP for good. The socket may also leave the
 * sockhash (no sk_msg cost, no tcp_bpf receive path) if nothing was ever
 * redirected into it: closing its gate first, atomically, makes sure
 * nothing will be. Returns 0 if it stays in the map.
 */
static __always_inline int sockredir_go_tcp(__u32 *flags, struct sockredir_key *own)
{
	__u32 closed = SOCKREDIR_GATE_CLOSED;
	__u32 *gate;

	*flags |= SOCKREDIR_FLOW_TCP | SOCKREDIR_FLOW_TCP_SEEN;
	if (!sockredir_gate_set(own, &closed))
		goto removable;
	gate = sockredir_gate_get(own);
	if (gate && *gate == SOCKREDIR_GATE_CLOSED)
		goto removable;
	return 0;
removable:
	*flags |= SOCKREDIR_FLOW_REMOVE;
	return 1;
}

/*
 * Switch the peer's direction to TCP (redirect -> TCP keeps the order). Its
 * sk_msg may be redirecting into us at this moment (the redirect completes
 * after the verdict, outside its socket lock): only its own next send, which
 * sees the flag and sets SOCKREDIR_FLOW_TCP_SEEN, tells that none is in
 * flight any more, and this socket leaves the map no earlier
 * (sockredir_on_ack). Not atomic (no 32-bit atomics before -mcpu=v3): the
 * peer's sk_msg may write its flags at the same moment and undo this. Then it
 * just keeps redirecting, and this socket stays in the map: slower, never out
 * of order, nothing lost.
 */
static __always_inline void sockredir_peer_go_tcp(struct sockredir_flow *flow, int side)
{
	flow->flags[side ^ 1] |= SOCKREDIR_FLOW_TCP;
}

/*
 * Take the socket out of the sockhash (its psock goes: plain TCP again) and
 * keep only the STATE callback, for the clean-up at close.
 */
static __always_inline void sockredir_leave(struct bpf_sock_ops *skops,
					    struct sockredir_key *key, __u32 *flags)
{
	if (!sockredir_sock_remove(key))
		sockredir_decided(SOCKREDIR_STAT_REMOVED, key);
	*flags &= ~(SOCKREDIR_FLOW_REMOVE | SOCKREDIR_FLOW_ADMITTED);
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

/*
 * An ACK for a socket of ours: if it sends over TCP, it should leave the
 * map (its sends skip the sk_msg copy; its blocking reads can no longer see
 * the spurious EAGAIN of a socket in a sockhash fed by TCP). Deleting drops
 * the socket's unread redirected bytes, so only when it has none and will
 * get none: its gate was closed before anything was redirected into it, or
 * its peer has sent over TCP since its direction switched (so no redirect of
 * it is in flight, SOCKREDIR_FLOW_TCP_SEEN) and its queue is empty.
 */
static __always_inline void sockredir_on_ack(struct bpf_sock_ops *skops,
					     struct sockredir_key *key)
{
	struct sockredir_key conn = {};
	int side = sockredir_flow_key(key, &conn) & 1;
	struct sockredir_flow *flow = sockredir_flow_get(&conn);
	__u32 peer;

	if (!flow || !(flow->flags[side] & SOCKREDIR_FLOW_TCP))
		return;
	peer = flow->flags[side ^ 1];
	if (!(flow->flags[side] & SOCKREDIR_FLOW_REMOVE)) {
		if (!SOCKREDIR_SEES_INGRESS) {
			/* can never tell: stop the callbacks, keep STATE for the clean-up */
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
			return;
		}
		if (((peer & SOCKREDIR_FLOW_ADMITTED) && !(peer & SOCKREDIR_FLOW_TCP_SEEN)) ||
		    !sockredir_ingress_empty(skops))
			return;	/* ask again at the next ACK */
	}
	sockredir_leave(skops, key, &flow->flags[side]);
}

/*
 * The socket shut down its sending side (shutdown(SHUT_WR), or close()
 * after sock_map_close already took it out). A socket in a sockhash waits
 * for data in tcp_bpf_recvmsg, which turns any wake-up without data into
 * EAGAIN, even on a blocking socket; the ACK of this FIN is such a wake-up
 * (FIN_WAIT1 -> FIN_WAIT2), so "send, shutdown(SHUT_WR), block for the
 * reply" could fail. The socket leaves the map now, before the application
 * can block in a read, if nothing was ever redirected into it: closing its
 * gate (set-once, atomic) first makes sure nothing will be. Otherwise the
 * peer's remaining sends go TCP (redirect -> TCP keeps the order): the
 * reply then arrives with the ACK, and the socket leaves at an ACK once its
 * redirected queue is empty and the peer has sent over TCP (sockredir_on_ack).
 */
static __always_inline void sockredir_on_shutdown(struct bpf_sock_ops *skops,
						  struct sockredir_key *key)
{
	struct sockredir_key conn = {};
	int side = sockredir_flow_key(key, &conn) & 1;
	struct sockredir_flow *flow = sockredir_flow_get(&conn);

	if (!flow || !(flow->flags[side] & SOCKREDIR_FLOW_ADMITTED))
		return;
	if (sockredir_go_tcp(&flow->flags[side], key)) {
		sockredir_leave(skops, key, &flow->flags[side]);
		return;
	}
	sockredir_peer_go_tcp(flow, side);
}

static __always_inline void sockredir_forget(struct sockredir_key *key)
{
	struct sockredir_key conn = {};

	sockredir_flow_key(key, &conn);
	sockredir_flow_forget(&conn);
	sockredir_gate_forget(key);
}

SOCKREDIR_PROG("sockops")
int sockredir_ops(struct bpf_sock_ops *skops)
{
	struct sockredir_key key = {};

	switch (skops->op) {
	case BPF_SOCK_OPS_TIMEOUT_INIT:
		sockredir_note_request(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (!sockredir_ops_key(skops, &key))
			sockredir_admit(skops, &key);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		if (!sockredir_ops_key(skops, &key))
			sockredir_on_ack(skops, &key);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args: the old state, the new one */
		if (skops->args[1] == BPF_TCP_CLOSE && !sockredir_ops_key(skops, &key))
			sockredir_forget(&key);
		else if (skops->args[1] == BPF_TCP_FIN_WAIT1 && !sockredir_ops_key(skops, &key))
			sockredir_on_shutdown(skops, &key);
		break;
	}
	/* cgroup programs report success with 1; 0 would mean -EPERM */
	return 1;
}

/* Would leaving the map be safe now? Then the small-write switch may go. */
static __always_inline int sockredir_may_leave(struct sockredir_key *own)
{
	__u32 *gate = sockredir_gate_get(own);

	return !gate || *gate == SOCKREDIR_GATE_CLOSED;
}

static __always_inline int sockredir_pass(__u64 size)
{
	sockredir_count(SOCKREDIR_STAT_PASSED_MSGS, 1);
	sockredir_count(SOCKREDIR_STAT_PASSED_BYTES, size);
	return SK_PASS;
}

SOCKREDIR_PROG("sk_msg")
int sockredir_msg(struct sk_msg_md *msg)
{
	struct sockredir_key peer = {}, own = {}, conn = {};
	struct sockredir_flow *flow, fresh = {};
	struct sockredir_settings *cfg;
	__u64 size = msg->size;
	__u32 open = SOCKREDIR_GATE_OPEN, small_bytes, small_streak;
	__u32 *flags, *streak, *gate;
	int side;

	if (sockredir_msg_peer_key(msg, &peer))
		return sockredir_pass(size);
	sockredir_mirror(&peer, &own);
	side = sockredir_flow_key(&own, &conn) & 1;
	flow = sockredir_flow_get(&conn);
	if (!flow) {
		/*
		 * Gone with the peer's close (sockets inserted by an older
		 * version keep that version's sk_msg): the peer is not there.
		 */
		if (side)
			fresh.flags[1] = SOCKREDIR_FLOW_ADMITTED;
		else
			fresh.flags[0] = SOCKREDIR_FLOW_ADMITTED;
		sockredir_flow_put(&conn, &fresh, BPF_NOEXIST);
		flow = sockredir_flow_get(&conn);
		if (!flow)
			return sockredir_pass(size);
	}
	flags = &flow->flags[side];
	streak = &flow->small_streak[side];
	/* the peer just received: its next small send answers, it does not stream */
	flow->small_streak[side ^ 1] = 0;

	/*
	 * SK_PASS without a redirect target sends the data the normal TCP way
	 * (SK_DROP would fail the sendmsg() with EACCES).
	 */
	if (*flags & SOCKREDIR_FLOW_TCP) {
		/* set by the peer (sockredir_peer_go_tcp): tell it we saw it */
		*flags |= SOCKREDIR_FLOW_TCP_SEEN;
		return sockredir_pass(size);
	}

	cfg = sockredir_settings_get();
	small_bytes = cfg && cfg->small_bytes ? cfg->small_bytes : SOCKREDIR_SMALL_BYTES;
	small_streak = cfg && cfg->small_streak ? cfg->small_streak : SOCKREDIR_SMALL_STREAK;
	if (size >= small_bytes) {
		*streak = 0;
	} else if (++*streak >= small_streak && SOCKREDIR_SEES_INGRESS &&
		   !(*flags & SOCKREDIR_FLOW_KEEP)) {
		/*
		 * A stream of small writes: TCP coalesces them, a redirect
		 * pays a wake-up each. Only if the socket can leave the map
		 * (a TCP sender left in it pays the sk_msg copy and can see
		 * spurious EAGAIN on blocking reads).
		 */
		if (sockredir_may_leave(&own) && sockredir_go_tcp(flags, &own)) {
			sockredir_decided(SOCKREDIR_STAT_DEMOTED_SMALL_WRITES, &own);
			return sockredir_pass(size);
		}
		*flags &= ~SOCKREDIR_FLOW_TCP;
		*flags |= SOCKREDIR_FLOW_KEEP;
		sockredir_decided(SOCKREDIR_STAT_DEMOTION_REFUSED, &own);
	}

	if (!(*flags & SOCKREDIR_FLOW_PEER_GATE_OPEN)) {
		/* first redirect into the peer: open its gate, unless it closed it */
		if (!(flow->flags[side ^ 1] & SOCKREDIR_FLOW_ADMITTED))
			goto peer_absent;
		sockredir_gate_set(&peer, &open);
		gate = sockredir_gate_get(&peer);
		if (!gate || *gate != SOCKREDIR_GATE_OPEN)
			goto peer_absent;
		*flags |= SOCKREDIR_FLOW_PEER_GATE_OPEN;
	}
	if (sockredir_redirect(msg, &peer) == SK_PASS) {
		sockredir_count(SOCKREDIR_STAT_REDIRECTED_MSGS, 1);
		sockredir_count(SOCKREDIR_STAT_REDIRECTED_BYTES, size);
		return SK_PASS;
	}

peer_absent:
	/*
	 * The peer is not in the map (not yet inserted, already gone, left
	 * for TCP): these bytes go TCP, and so must every later one.
	 */
	sockredir_go_tcp(flags, &own);
	sockredir_decided(SOCKREDIR_STAT_TCP_PEER_ABSENT, &own);
	return sockredir_pass(size);
}

SOCKREDIR_LICENSE
