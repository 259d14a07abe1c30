// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Test object of the libbpf loader (tests/test_object_loader.py), written the
 * way the role's programs will be: BTF map definitions, SEC() names, license
 * last. Same job as files/bpf/sockredir.bpf.c, cut down: test_ops inserts
 * established TCP sockets of its cgroup into test_hash, test_msg redirects a
 * send to the peer socket, test_stats counts, test_config is read at run
 * time (a policy change writes the map, it reloads nothing).
 *
 * Built by scripts/build-bpf.sh into redir_test.bpf.o next to this file.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

/* Endpoint seen from the socket that owns it; same layout as sockredir.h. */
struct test_key {
	__u32 local_ip[4];	/* network byte order, IPv4 as ::ffff:a.b.c.d */
	__u32 remote_ip[4];
	__u32 local_port;	/* host byte order */
	__u32 remote_port;	/* host byte order */
	__u64 netns_cookie;	/* the same 4-tuple in two netns differs here */
};

/* Value of test_config[0]; user space writes it as 8 bytes, little endian. All zero: redirect all. */
struct test_config {
	__u32 pass_all;		/* 1: every send takes the TCP path */
	__u32 deny_port;	/* a connection touching this port is passed */
};

enum test_stat {
	TEST_STAT_REDIRECTED = 0,
	TEST_STAT_PASSED = 1,
	TEST_STAT_INSERTED = 2,
	TEST_STAT_MAX = 3,
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1024);
	__type(key, struct test_key);
	__type(value, __u64);
} test_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TEST_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} test_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct test_config);
} test_config SEC(".maps");

static __always_inline void test_count(__u32 stat)
{
	__u64 *val = bpf_map_lookup_elem(&test_stats, &stat);

	if (val)
		__sync_fetch_and_add(val, 1);
}

static __always_inline void test_ip4_mapped(__u32 ip[4], __u32 ip4)
{
	ip[0] = 0;
	ip[1] = 0;
	ip[2] = bpf_htonl(0x0000ffff);
	ip[3] = ip4;
}

/* The verifier wants 4-byte reads of the ip6 arrays: volatile keeps them apart. */
static __always_inline void test_ip6_copy(__u32 dst[4], const __u32 *ctx_ip6)
{
	const volatile __u32 *src = ctx_ip6;

	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

/* remote_port: network-order port in the upper 16 bits, read as a whole. */
static __always_inline __u32 test_remote_port(__u32 field)
{
	return bpf_ntohl(field);
}

static __always_inline int test_allowed(const struct test_key *key)
{
	__u32 zero = 0;
	struct test_config *cfg = bpf_map_lookup_elem(&test_config, &zero);

	if (!cfg || cfg->pass_all)
		return 0;
	return !cfg->deny_port ||
	       (cfg->deny_port != key->local_port && cfg->deny_port != key->remote_port);
}

SEC("sockops")
int test_ops(struct bpf_sock_ops *skops)
{
	struct test_key key = {};

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	switch (skops->family) {
	case AF_INET:
		test_ip4_mapped(key.local_ip, skops->local_ip4);
		test_ip4_mapped(key.remote_ip, skops->remote_ip4);
		break;
	case AF_INET6:
		test_ip6_copy(key.local_ip, skops->local_ip6);
		test_ip6_copy(key.remote_ip, skops->remote_ip6);
		break;
	default:
		return 1;
	}
	key.local_port = skops->local_port;
	key.remote_port = test_remote_port(skops->remote_port);
	key.netns_cookie = bpf_get_netns_cookie(skops);
	if (!bpf_sock_hash_update(skops, &test_hash, &key, BPF_ANY))
		test_count(TEST_STAT_INSERTED);
	return 1;
}

SEC("sk_msg")
int test_msg(struct sk_msg_md *msg)
{
	struct test_key peer = {};

	switch (msg->family) {
	case AF_INET:
		test_ip4_mapped(peer.local_ip, msg->remote_ip4);
		test_ip4_mapped(peer.remote_ip, msg->local_ip4);
		break;
	case AF_INET6:
		test_ip6_copy(peer.local_ip, msg->remote_ip6);
		test_ip6_copy(peer.remote_ip, msg->local_ip6);
		break;
	default:
		return SK_PASS;
	}
	peer.local_port = test_remote_port(msg->remote_port);
	peer.remote_port = msg->local_port;
	peer.netns_cookie = bpf_get_netns_cookie(msg);
	/* Redirect -> TCP is order-safe, so the switch may flip at any time. */
	if (test_allowed(&peer) &&
	    bpf_msg_redirect_hash(msg, &test_hash, &peer, BPF_F_INGRESS) == SK_PASS) {
		test_count(TEST_STAT_REDIRECTED);
		return SK_PASS;
	}
	test_count(TEST_STAT_PASSED);
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
