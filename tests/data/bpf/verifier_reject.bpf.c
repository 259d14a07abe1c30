// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Test object the kernel must refuse (tests/test_object_loader.py): it
 * compiles and libbpf opens it, but bad_msg reads the message data without
 * the bounds check the verifier demands. Its map shows that a refused load
 * leaves no pin behind.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} bad_hash SEC(".maps");

SEC("sk_msg")
int bad_msg(struct sk_msg_md *msg)
{
	__u32 key = 0;
	char *data = msg->data;

	if (data[0] == 'x') /* no check against msg->data_end */
		return bpf_msg_redirect_hash(msg, &bad_hash, &key, BPF_F_INGRESS);
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
