// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Same-host TCP acceleration by socket redirection.
 *
 * sockredir_ops (sock_ops, attached to a cgroup) puts every established
 * IPv4/IPv6 TCP socket of that cgroup into the sockhash, keyed by its own
 * endpoint. sockredir_msg (sk_msg, attached to the sockhash) runs on every
 * sendmsg() of those sockets, looks the peer socket up by the mirrored key
 * and, when the peer is in the map (both ends on this host, in the cgroup),
 * queues the data straight onto the peer's receive queue: no TCP/IP stack,
 * no loopback device.
 *
 * Optional compile-time port policy, comma-separated lists of ports:
 *   -DSOCKREDIR_ALLOW_PORTS=80,443  only connections whose local or remote
 *                                   port is listed are accelerated
 *   -DSOCKREDIR_DENY_PORTS=22       connections touching a listed port never
 *                                   are (deny wins over allow)
 * Both ends of a connection share the same two ports, so the policy decides
 * the same way for both sockets: either both are in the map or neither is.
 */
#include <uapi/linux/bpf.h>
#include "sockredir.h"

#ifndef E2BIG
#define E2BIG 7
#endif

/* A list is matched by a fully unrolled loop: keep the program small. */
#define SOCKREDIR_MAX_POLICY_PORTS 64

#define SOCKREDIR_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

static __always_inline void sockredir_count(__u32 stat, __u64 n)
{
	__u64 *val = sockredir_stats.lookup(&stat);

	/*
	 * Per-CPU, yet still atomic: these programs run with migration
	 * disabled but may be preempted, and another task's sendmsg on the
	 * same CPU would otherwise lose an update.
	 */
	if (val)
		__sync_fetch_and_add(val, n);
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
	return sockredir_port_listed(allow, SOCKREDIR_ARRAY_SIZE(allow), key);
#else
	return 1;
#endif
}

int sockredir_ops(struct bpf_sock_ops *skops)
{
	struct sockredir_key key = {};
	long err;

	/*
	 * Both ends get here once the handshake completes: the connect()ing
	 * socket as ACTIVE, the accept()ed one as PASSIVE. Listeners never
	 * do, and only established sockets can take redirected data.
	 */
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (sockredir_ops_key(skops, &key))
		return 1;
	if (!sockredir_policy_allows(&key))
		return 1;

	err = sockredir_hash.sock_hash_update(skops, &key, BPF_ANY);
	if (!err)
		sockredir_count(SOCKREDIR_STAT_INSERTED, 1);
	else if (err == -E2BIG)
		sockredir_count(SOCKREDIR_STAT_INSERT_FULL, 1);
	else
		sockredir_count(SOCKREDIR_STAT_INSERT_FAILED, 1);

	/* cgroup programs report success with 1; 0 would mean -EPERM */
	return 1;
}

int sockredir_msg(struct sk_msg_md *msg)
{
	struct sockredir_key peer = {};
	__u64 size = msg->size;

	if (!sockredir_msg_peer_key(msg, &peer) &&
	    sockredir_hash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS) == SK_PASS) {
		sockredir_count(SOCKREDIR_STAT_REDIRECTED_MSGS, 1);
		sockredir_count(SOCKREDIR_STAT_REDIRECTED_BYTES, size);
		return SK_PASS;
	}

	/*
	 * The peer is not in the map (another host, a socket outside the
	 * cgroup, a port the policy excludes): SK_PASS without a redirect
	 * target sends the data the normal TCP way. SK_DROP would fail the
	 * sendmsg() with EACCES.
	 */
	sockredir_count(SOCKREDIR_STAT_PASSED_MSGS, 1);
	sockredir_count(SOCKREDIR_STAT_PASSED_BYTES, size);
	return SK_PASS;
}

/* BCC's footer emits the license section from this (GPL is its default). */
#define BPF_LICENSE GPL
