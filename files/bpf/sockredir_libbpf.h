/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The maps of the socket redirection programs with BTF definitions, for the
 * object built once by clang (scripts/build-bpf.sh) and loaded by libbpf,
 * and the accessors the program body (sockredir.bpf.c) uses. Same maps,
 * names and shapes as sockredir_bcc.h: a host can move between the loaders
 * and keep its pinned maps (and the sockets in them).
 *
 * The loader (plugins/module_utils/objloader.py) pins every map by name under
 * the instance's pin root, and reuses a map already pinned there with the same
 * shape, so a reload keeps the sockets in the sockhash. No LIBBPF_PIN_BY_NAME
 * here: libbpf would pin those under its default root, shared by every
 * instance on the host.
 */
#ifndef __SOCKREDIR_LIBBPF_H
#define __SOCKREDIR_LIBBPF_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "sockredir.h"

#define SOCKREDIR_PROG(section) SEC(section)

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SOCKREDIR_MAP_SIZE);
	__type(key, struct sockredir_key);
	__type(value, __u32);
} sockredir_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SOCKREDIR_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sockredir_stats SEC(".maps");

/* Path state of every admitted connection; entries go when a side closes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SOCKREDIR_MAP_SIZE);
	__type(key, struct sockredir_key);
	__type(value, struct sockredir_flow);
} sockredir_flows SEC(".maps");

/* Receive gates (SOCKREDIR_GATE_*); entries go when the socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SOCKREDIR_MAP_SIZE);
	__type(key, struct sockredir_key);
	__type(value, __u32);
} sockredir_gates SEC(".maps");

/* Connection requests a listener of ours has seen (see sockredir_bcc.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SOCKREDIR_MAP_SIZE);
	__type(key, struct sockredir_key);
	__type(value, __u32);
} sockredir_reqs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sockredir_settings);
} sockredir_cfg SEC(".maps");

/* The port policy (SOCKREDIR_PORT_*), written by the loader at run time. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SOCKREDIR_MAX_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} sockredir_ports SEC(".maps");

static __always_inline __u64 *sockredir_stat_slot(__u32 stat)
{
	return bpf_map_lookup_elem(&sockredir_stats, &stat);
}

static __always_inline struct sockredir_flow *sockredir_flow_get(struct sockredir_key *conn)
{
	return bpf_map_lookup_elem(&sockredir_flows, conn);
}

static __always_inline long sockredir_flow_put(struct sockredir_key *conn,
					       struct sockredir_flow *flow, __u64 flags)
{
	return bpf_map_update_elem(&sockredir_flows, conn, flow, flags);
}

static __always_inline void sockredir_flow_forget(struct sockredir_key *conn)
{
	bpf_map_delete_elem(&sockredir_flows, conn);
}

static __always_inline __u32 *sockredir_gate_get(struct sockredir_key *key)
{
	return bpf_map_lookup_elem(&sockredir_gates, key);
}

/* BPF_NOEXIST: 0 when this call set the gate, an error when it was set */
static __always_inline long sockredir_gate_set(struct sockredir_key *key, __u32 *gate)
{
	return bpf_map_update_elem(&sockredir_gates, key, gate, BPF_NOEXIST);
}

static __always_inline void sockredir_gate_forget(struct sockredir_key *key)
{
	bpf_map_delete_elem(&sockredir_gates, key);
}

static __always_inline int sockredir_req_seen(struct sockredir_key *key)
{
	return bpf_map_lookup_elem(&sockredir_reqs, key) != 0;
}

static __always_inline void sockredir_req_note(struct sockredir_key *key)
{
	__u32 one = 1;

	bpf_map_update_elem(&sockredir_reqs, key, &one, BPF_ANY);
}

static __always_inline void sockredir_req_forget(struct sockredir_key *key)
{
	bpf_map_delete_elem(&sockredir_reqs, key);
}

static __always_inline struct sockredir_settings *sockredir_settings_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&sockredir_cfg, &zero);
}

static __always_inline __u32 sockredir_port_verdict(__u32 port)
{
	__u32 *verdict = bpf_map_lookup_elem(&sockredir_ports, &port);

	return verdict ? *verdict : 0;
}

/* One trace_pipe line per decision (SOCKREDIR_SET_DEBUG); the same text as the BCC build. */
static __always_inline void sockredir_trace(__u32 stat, __u32 instance, const struct sockredir_key *key)
{
	__u32 l = key->local_port, r = key->remote_port;

	switch (stat) {
	case SOCKREDIR_STAT_INSERTED:
		bpf_printk("sockredir %x %u>%u admitted", instance, l, r); break;
	case SOCKREDIR_STAT_INSERT_FULL:
		bpf_printk("sockredir %x %u>%u not admitted: sockhash full", instance, l, r); break;
	case SOCKREDIR_STAT_INSERT_FAILED:
		bpf_printk("sockredir %x %u>%u not admitted: insert failed", instance, l, r); break;
	case SOCKREDIR_STAT_NOT_ADMITTED_PEER:
		bpf_printk("sockredir %x %u>%u not admitted: peer not ours", instance, l, r); break;
	case SOCKREDIR_STAT_NOT_ADMITTED_EARLY_DATA:
		bpf_printk("sockredir %x %u>%u not admitted: data before established", instance, l, r); break;
	case SOCKREDIR_STAT_NOT_ADMITTED_POLICY:
		bpf_printk("sockredir %x %u>%u not admitted: port policy", instance, l, r); break;
	case SOCKREDIR_STAT_DEMOTED_SMALL_WRITES:
		bpf_printk("sockredir %x %u>%u to tcp: small writes", instance, l, r); break;
	case SOCKREDIR_STAT_TCP_PEER_ABSENT:
		bpf_printk("sockredir %x %u>%u to tcp: peer absent", instance, l, r); break;
	case SOCKREDIR_STAT_REMOVED:
		bpf_printk("sockredir %x %u>%u left the sockhash", instance, l, r); break;
	case SOCKREDIR_STAT_DEMOTION_REFUSED:
		bpf_printk("sockredir %x %u>%u small writes stay redirected", instance, l, r); break;
	}
}

static __always_inline long sockredir_sock_insert(struct bpf_sock_ops *skops,
						  struct sockredir_key *key)
{
	return bpf_sock_hash_update(skops, &sockredir_hash, key, BPF_ANY);
}

static __always_inline long sockredir_sock_remove(struct sockredir_key *key)
{
	return bpf_map_delete_elem(&sockredir_hash, key);
}

static __always_inline int sockredir_redirect(struct sk_msg_md *msg, struct sockredir_key *peer)
{
	return bpf_msg_redirect_hash(msg, &sockredir_hash, peer, BPF_F_INGRESS);
}

/*
 * The two kernel fields sockredir_ingress_empty() reads, relocated by libbpf
 * against the running kernel's BTF (CO-RE): a different layout is fine, a
 * kernel without them fails the load instead of reading the wrong bytes.
 */
struct sockredir_list_head {
	struct sockredir_list_head *next;
};
struct sock___sockredir {
	void *sk_user_data;
} __attribute__((preserve_access_index));
struct sk_psock___sockredir {
	struct sockredir_list_head ingress_msg;
} __attribute__((preserve_access_index));

/* the low bits of sk_user_data are flags (SK_USER_DATA_NOCOPY, _BPF, _PSOCK) */
#define SOCKREDIR_USER_DATA_PTRMASK (~7UL)

#define SOCKREDIR_SEES_INGRESS 1

/*
 * Is the socket's queue of redirected bytes (its psock's ingress_msg) empty?
 * 0 when it cannot tell. Once the peer no longer redirects, an empty queue
 * stays empty, and the socket can leave the sockhash without dropping a byte.
 */
static __always_inline int sockredir_ingress_empty(struct bpf_sock_ops *skops)
{
	struct bpf_sock *bsk = skops->sk;
	struct sock___sockredir *sk;
	struct sk_psock___sockredir *psock;
	struct sockredir_list_head *next = 0;
	void *user_data = 0;

	if (!bsk)
		return 0;
	/* perfmon-gated helper: the loader runs as root */
	sk = (struct sock___sockredir *)bpf_skc_to_tcp_sock(bsk);
	if (!sk || bpf_core_read(&user_data, sizeof(user_data), &sk->sk_user_data) || !user_data)
		return 0;
	psock = (struct sk_psock___sockredir *)((unsigned long)user_data & SOCKREDIR_USER_DATA_PTRMASK);
	if (bpf_core_read(&next, sizeof(next), &psock->ingress_msg.next))
		return 0;
	return next == (struct sockredir_list_head *)
		       __builtin_preserve_access_index(&psock->ingress_msg);
}

#define SOCKREDIR_LICENSE char _license[] SEC("license") = "GPL";

#endif /* __SOCKREDIR_LIBBPF_H */
