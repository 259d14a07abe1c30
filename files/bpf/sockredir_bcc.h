/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The maps of the socket redirection programs as BCC declares them (their
 * accessors are in sockredir.bpf.c: BCC rewrites map calls only in the main
 * file). BCC compiles on the managed host; the loader passes:
 *   BPF_PIN_DIR   string literal, bpffs directory the maps pin in: BCC
 *                 creates and pins a map when its path is missing and reuses
 *                 it when present, so a reload keeps the sockets in the map.
 * The object build (sockredir_libbpf.h) declares the same maps.
 */
#ifndef __SOCKREDIR_BCC_H
#define __SOCKREDIR_BCC_H

#include <uapi/linux/bpf.h>
#include "sockredir.h"

#ifndef BPF_PIN_DIR
#error "BPF_PIN_DIR is not defined: pass -DBPF_PIN_DIR=\"/sys/fs/bpf/<dir>\" (a string literal naming a bpffs directory)"
#endif

#define SOCKREDIR_PROG(section)

/*
 * BCC compiles against header files, not the running kernel's BTF: it cannot
 * read the psock's queue portably (sockredir_libbpf.h can). Without that, a
 * receiver of a switched stream could never leave the map, so the small-write
 * switch is off here.
 */
#define SOCKREDIR_SEES_INGRESS 0

static __always_inline int sockredir_ingress_empty(struct bpf_sock_ops *skops)
{
	return 0;
}

/*
 * BCC 0.26's BPF_TABLE_PINNED() declares the generic table struct, which has
 * no sock_hash_update / msg_redirect_hash members, so a pinned sockhash
 * declared with it cannot call them. This is BCC's BPF_SOCKHASH() struct
 * with the "<type>:<pin path>" section BPF_TABLE_PINNED() would emit: BCC
 * creates and pins the map when the path is missing and reuses it when
 * present, so a reload keeps the sockets already in the map.
 */
#define SOCKREDIR_SOCKHASH_PINNED(_name, _key_type, _max_entries, _pinned)	\
struct _name##_table_t {							\
	_key_type key;								\
	int leaf;								\
	int (*update)(_key_type *, int *);					\
	int (*delete)(_key_type *);						\
	int (*sock_hash_update)(void *, void *, u64);				\
	int (*msg_redirect_hash)(void *, void *, u64);				\
	int (*sk_redirect_hash)(void *, void *, u64);				\
	u32 max_entries;							\
};										\
__attribute__((section("maps/sockhash:" _pinned)))				\
struct _name##_table_t _name = { .max_entries = (_max_entries) };		\
BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)

SOCKREDIR_SOCKHASH_PINNED(sockredir_hash, struct sockredir_key,
			  SOCKREDIR_MAP_SIZE, BPF_PIN_DIR "/sockredir_hash");

BPF_TABLE_PINNED("percpu_array", u32, u64, sockredir_stats,
		 SOCKREDIR_STAT_MAX, BPF_PIN_DIR "/sockredir_stats");

/* Path state of every admitted connection; entries go when a side closes. */
BPF_TABLE_PINNED("hash", struct sockredir_key, struct sockredir_flow,
		 sockredir_flows, SOCKREDIR_MAP_SIZE, BPF_PIN_DIR "/sockredir_flows");

/* Receive gates (SOCKREDIR_GATE_*); entries go when the socket closes. */
BPF_TABLE_PINNED("hash", struct sockredir_key, u32, sockredir_gates,
		 SOCKREDIR_MAP_SIZE, BPF_PIN_DIR "/sockredir_gates");

/*
 * Connection requests a listener of ours has seen (its own key): the proof,
 * for the connecting side, that its peer is a socket of this host, in this
 * netns, under these programs. LRU: requests that never complete age out.
 */
BPF_TABLE_PINNED("lru_hash", struct sockredir_key, u32, sockredir_reqs,
		 SOCKREDIR_MAP_SIZE, BPF_PIN_DIR "/sockredir_reqs");

BPF_TABLE_PINNED("array", u32, struct sockredir_settings, sockredir_cfg,
		 1, BPF_PIN_DIR "/sockredir_cfg");

/* The port policy (SOCKREDIR_PORT_*), written by the loader at run time. */
BPF_TABLE_PINNED("hash", u32, u32, sockredir_ports,
		 SOCKREDIR_MAX_PORTS, BPF_PIN_DIR "/sockredir_ports");

/* BCC's footer emits the license section from this (GPL is its default). */
#define BPF_LICENSE GPL
#define SOCKREDIR_LICENSE

#endif /* __SOCKREDIR_BCC_H */
