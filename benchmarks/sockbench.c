// SPDX-License-Identifier: GPL-3.0-or-later
/*
 * sockbench: the two ends of one benchmark measurement, TCP or AF_UNIX stream.
 *
 *   sockbench server --family tcp|unix --addr ADDR|PATH --mode stream|pingpong
 *                    --size N [--pairs N] [--nodelay 0|1] [--reply 0|1]
 *       Listens (TCP: ADDR port 0, the kernel picks one), prints
 *       "listening PORT" on stdout, accepts --pairs connections, then serves
 *       them until every client has closed: stream counts what it reads,
 *       pingpong echoes every --size bytes back. Prints one JSON line.
 *
 *   sockbench client --family tcp|unix --addr ADDR|PATH [--port N]
 *                    --mode stream|pingpong --size N [--pairs N]
 *                    [--nodelay 0|1] [--reply 0|1] --duration SECONDS
 *       Opens --pairs connections, then for --duration seconds writes
 *       --size bytes per write() (stream) or sends --size bytes and waits
 *       for the echo (pingpong, one connection), closes its sending side,
 *       waits for the server's close and prints one JSON line.
 *
 *   --reply 1 (stream): once a connection reached EOF the server writes
 *       the byte count it read on it (8 bytes, host order) before closing;
 *       the client reads that reply with a blocking read after its
 *       shutdown(SHUT_WR) and compares it with what it wrote. The pattern
 *       where a socket in a sockhash fed by plain TCP was seen to fail a
 *       blocking read with EAGAIN.
 *
 * Errors are counted, not hidden: "eagain_read" and "eagain_write" in the
 * JSON line count reads and writes on blocking sockets (or on a socket epoll
 * called ready) that failed with EAGAIN, which a correct kernel never does;
 * the call is retried.
 * "bad_replies" counts replies that did not match. Any other failure exits.
 *
 * Written in C because the client must not be the bottleneck: a Python loop
 * cannot issue a million 64-byte writes a second. One thread per process;
 * several connections are driven with epoll, so the client stays on the one
 * core it is pinned to and the server on the other.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define READ_BUF (256 * 1024)
#define MAX_PAIRS 1024
/* Writes per connection per epoll wake-up: keeps many connections fair. */
#define WRITE_BURST 64

struct opts {
	int server;
	int unix_family;
	const char *addr;
	int port;
	int pingpong;
	size_t size;
	int pairs;
	int nodelay;
	int reply;
	double duration;
};

/* Reads and writes on a blocking socket that failed with EAGAIN. */
static uint64_t eagain_read, eagain_write;

static void die(const char *what)
{
	fprintf(stderr, "sockbench: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void usage(const char *msg)
{
	fprintf(stderr, "sockbench: %s (see the comment at the top of sockbench.c)\n", msg);
	exit(64);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static void set_nonblocking(int fd, int on)
{
	int flags = fcntl(fd, F_GETFL);

	if (flags < 0 || fcntl(fd, F_SETFL, on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK) < 0)
		die("fcntl");
}

static void set_nodelay(const struct opts *o, int fd)
{
	if (o->unix_family)
		return;
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &o->nodelay, sizeof(o->nodelay)) < 0)
		die("setsockopt TCP_NODELAY");
}

static socklen_t unix_addr(const char *path, struct sockaddr_un *sun)
{
	memset(sun, 0, sizeof(*sun));
	sun->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sun->sun_path))
		usage("unix socket path too long");
	strcpy(sun->sun_path, path);
	return sizeof(*sun);
}

static socklen_t tcp_addr(const char *addr, int port, struct sockaddr_in *sin)
{
	memset(sin, 0, sizeof(*sin));
	sin->sin_family = AF_INET;
	sin->sin_port = htons(port);
	if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1)
		usage("--addr is not an IPv4 address");
	return sizeof(*sin);
}

static int listen_socket(const struct opts *o)
{
	int one = 1, fd;

	if (o->unix_family) {
		struct sockaddr_un sun;
		socklen_t len = unix_addr(o->addr, &sun);

		fd = socket(AF_UNIX, SOCK_STREAM, 0);
		if (fd < 0)
			die("socket");
		unlink(o->addr);
		if (bind(fd, (struct sockaddr *)&sun, len) < 0)
			die("bind");
	} else {
		struct sockaddr_in sin;
		socklen_t len = tcp_addr(o->addr, 0, &sin);

		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0)
			die("socket");
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&sin, len) < 0)
			die("bind");
	}
	if (listen(fd, MAX_PAIRS) < 0)
		die("listen");
	return fd;
}

static int listening_port(const struct opts *o, int fd)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);

	if (o->unix_family)
		return 0;
	if (getsockname(fd, (struct sockaddr *)&sin, &len) < 0)
		die("getsockname");
	return ntohs(sin.sin_port);
}

static int connect_socket(const struct opts *o)
{
	int fd;

	if (o->unix_family) {
		struct sockaddr_un sun;
		socklen_t len = unix_addr(o->addr, &sun);

		fd = socket(AF_UNIX, SOCK_STREAM, 0);
		if (fd < 0)
			die("socket");
		if (connect(fd, (struct sockaddr *)&sun, len) < 0)
			die("connect");
	} else {
		struct sockaddr_in sin;
		socklen_t len = tcp_addr(o->addr, o->port, &sin);

		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0)
			die("socket");
		set_nodelay(o, fd);
		if (connect(fd, (struct sockaddr *)&sin, len) < 0)
			die("connect");
	}
	return fd;
}

/* Whole buffer or die; 0 when the peer closed before anything was read. */
static size_t read_full(int fd, char *buf, size_t n)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				eagain_read++;
				continue;
			}
			die("read");
		}
		if (r == 0) {
			if (got)
				usage("peer closed in the middle of a message");
			return 0;
		}
		got += r;
	}
	return got;
}

static void write_full(int fd, const char *buf, size_t n)
{
	while (n) {
		ssize_t w = write(fd, buf, n);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				eagain_write++;
				continue;
			}
			die("write");
		}
		buf += w;
		n -= w;
	}
}

static void drain_to_eof(int fd)
{
	char buf[4096];

	set_nonblocking(fd, 0);
	for (;;) {
		ssize_t r = read(fd, buf, sizeof(buf));

		if (r > 0)
			continue;
		if (r == 0)
			return;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN) {
			eagain_read++;
			continue;
		}
		die("read");
	}
}

/* ---- server ---------------------------------------------------------- */

static void serve_stream(const struct opts *o, int *conns)
{
	char *buf = malloc(READ_BUF);
	uint64_t bytes = 0, reads = 0, replied = 0;
	uint64_t *per_conn = calloc(o->pairs, sizeof(uint64_t));
	double first = 0, last = 0;
	int open = o->pairs, ep, i;
	struct epoll_event ev, events[64];

	if (!buf || !per_conn)
		die("malloc");
	ep = epoll_create1(0);
	if (ep < 0)
		die("epoll_create1");
	for (i = 0; i < o->pairs; i++) {
		ev.events = EPOLLIN;
		ev.data.u32 = i;
		if (epoll_ctl(ep, EPOLL_CTL_ADD, conns[i], &ev) < 0)
			die("epoll_ctl");
	}
	while (open) {
		int n;

		/* One connection: plain blocking reads, what a simple reader does. */
		if (o->pairs == 1) {
			events[0].data.u32 = 0;
			n = 1;
		} else {
			n = epoll_wait(ep, events, 64, -1);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				die("epoll_wait");
			}
		}
		for (i = 0; i < n; i++) {
			int k = events[i].data.u32, fd = conns[k];
			ssize_t r = read(fd, buf, READ_BUF);

			if (r < 0) {
				if (errno == EINTR)
					continue;
				/* blocking sockets; with several, epoll said readable */
				if (errno == EAGAIN) {
					eagain_read++;
					continue;
				}
				die("read");
			}
			if (r == 0) {
				last = now();
				epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
				if (o->reply) {
					write_full(fd, (const char *)&per_conn[k], sizeof(per_conn[k]));
					replied += sizeof(per_conn[k]);
				}
				close(fd);
				open--;
				continue;
			}
			if (!bytes)
				first = now();
			bytes += r;
			per_conn[k] += r;
			reads++;
		}
	}
	printf("{\"role\": \"server\", \"mode\": \"stream\", \"recv_bytes\": %llu, \"reads\": %llu, "
	       "\"sent_bytes\": %llu, \"elapsed\": %.9f, \"eagain_read\": %llu, "
	       "\"eagain_write\": %llu}\n",
	       (unsigned long long)bytes, (unsigned long long)reads, (unsigned long long)replied,
	       bytes ? last - first : 0.0, (unsigned long long)eagain_read,
	       (unsigned long long)eagain_write);
	free(per_conn);
	free(buf);
}

static void serve_pingpong(const struct opts *o, int fd)
{
	char *buf = malloc(o->size);
	uint64_t n = 0;

	if (!buf)
		die("malloc");
	while (read_full(fd, buf, o->size)) {
		write_full(fd, buf, o->size);
		n++;
	}
	close(fd);
	printf("{\"role\": \"server\", \"mode\": \"pingpong\", \"transactions\": %llu, "
	       "\"recv_bytes\": %llu, \"sent_bytes\": %llu, \"eagain_read\": %llu, "
	       "\"eagain_write\": %llu}\n",
	       (unsigned long long)n, (unsigned long long)(n * o->size),
	       (unsigned long long)(n * o->size), (unsigned long long)eagain_read,
	       (unsigned long long)eagain_write);
	free(buf);
}

static int run_server(const struct opts *o)
{
	int lfd = listen_socket(o), i;
	int *conns = calloc(o->pairs, sizeof(int));

	if (!conns)
		die("calloc");
	printf("listening %d\n", listening_port(o, lfd));
	fflush(stdout);
	for (i = 0; i < o->pairs; i++) {
		conns[i] = accept(lfd, NULL, NULL);
		if (conns[i] < 0)
			die("accept");
		set_nodelay(o, conns[i]);
	}
	close(lfd);
	if (o->unix_family)
		unlink(o->addr);
	if (o->pingpong)
		serve_pingpong(o, conns[0]);
	else
		serve_stream(o, conns);
	free(conns);
	return 0;
}

/* ---- client ---------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static double percentile_us(const uint64_t *sorted, uint64_t n, double p)
{
	uint64_t i;

	if (!n)
		return 0;
	i = (uint64_t)(p * (n - 1) + 0.5);
	return sorted[i] / 1e3;
}

static void client_pingpong(const struct opts *o, int fd)
{
	char *buf = malloc(o->size);
	uint64_t cap = 1 << 16, n = 0, *lat = malloc(cap * sizeof(*lat));
	double start, end, elapsed;

	if (!buf || !lat)
		die("malloc");
	memset(buf, 'p', o->size);
	start = now();
	end = start + o->duration;
	for (;;) {
		uint64_t t0 = now_ns();

		write_full(fd, buf, o->size);
		if (!read_full(fd, buf, o->size))
			usage("server closed during a transaction");
		if (n == cap) {
			cap *= 2;
			lat = realloc(lat, cap * sizeof(*lat));
			if (!lat)
				die("realloc");
		}
		lat[n++] = now_ns() - t0;
		if ((n & 15) == 0 && now() >= end)
			break;
	}
	elapsed = now() - start;
	shutdown(fd, SHUT_WR);
	drain_to_eof(fd);
	close(fd);
	qsort(lat, n, sizeof(*lat), cmp_u64);
	printf("{\"role\": \"client\", \"mode\": \"pingpong\", \"transactions\": %llu, "
	       "\"sent_bytes\": %llu, \"recv_bytes\": %llu, \"elapsed\": %.9f, "
	       "\"p50_us\": %.3f, \"p90_us\": %.3f, \"p99_us\": %.3f, \"p999_us\": %.3f, "
	       "\"eagain_read\": %llu, \"eagain_write\": %llu}\n",
	       (unsigned long long)n, (unsigned long long)(n * o->size),
	       (unsigned long long)(n * o->size), elapsed, percentile_us(lat, n, 0.50),
	       percentile_us(lat, n, 0.90), percentile_us(lat, n, 0.99),
	       percentile_us(lat, n, 0.999), (unsigned long long)eagain_read,
	       (unsigned long long)eagain_write);
	free(lat);
	free(buf);
}

static void client_stream(const struct opts *o, int *conns)
{
	char *buf = malloc(o->size);
	uint64_t bytes = 0, writes = 0, replies = 0, bad_replies = 0;
	uint64_t *per_conn = calloc(o->pairs, sizeof(uint64_t));
	double start, end, elapsed;
	int ep = -1, i;

	if (!buf || !per_conn)
		die("malloc");
	memset(buf, 's', o->size);
	if (o->pairs > 1) {
		struct epoll_event ev;

		ep = epoll_create1(0);
		if (ep < 0)
			die("epoll_create1");
		for (i = 0; i < o->pairs; i++) {
			set_nonblocking(conns[i], 1);
			ev.events = EPOLLOUT;
			ev.data.u32 = i;
			if (epoll_ctl(ep, EPOLL_CTL_ADD, conns[i], &ev) < 0)
				die("epoll_ctl");
		}
	}
	start = now();
	end = start + o->duration;
	if (o->pairs == 1) {
		/* Partial writes count what went through, the next write goes on. */
		for (;;) {
			ssize_t w = write(conns[0], buf, o->size);

			if (w < 0) {
				if (errno == EINTR)
					continue;
				if (errno == EAGAIN) {
					eagain_write++;
					continue;
				}
				die("write");
			}
			bytes += w;
			per_conn[0] += w;
			writes++;
			if ((writes & 63) == 0 && now() >= end)
				break;
		}
	} else {
		struct epoll_event events[64];

		while (now() < end) {
			int n = epoll_wait(ep, events, 64, 100);

			if (n < 0) {
				if (errno == EINTR)
					continue;
				die("epoll_wait");
			}
			for (i = 0; i < n; i++) {
				int k;

				for (k = 0; k < WRITE_BURST; k++) {
					int c = events[i].data.u32;
					/* non-blocking here: EAGAIN is the normal "buffer full" */
					ssize_t w = write(conns[c], buf, o->size);

					if (w < 0) {
						if (errno == EAGAIN || errno == EINTR)
							break;
						die("write");
					}
					bytes += w;
					per_conn[c] += w;
					writes++;
					if ((size_t)w < o->size)
						break;
				}
			}
		}
		close(ep);
	}
	elapsed = now() - start;
	for (i = 0; i < o->pairs; i++)
		shutdown(conns[i], SHUT_WR);
	/* The server has read everything once it closes its side. */
	for (i = 0; i < o->pairs; i++) {
		if (o->reply) {
			uint64_t count = 0;

			set_nonblocking(conns[i], 0);
			if (read_full(conns[i], (char *)&count, sizeof(count)) != sizeof(count) ||
			    count != per_conn[i])
				bad_replies++;
			else
				replies++;
		}
		drain_to_eof(conns[i]);
		close(conns[i]);
	}
	printf("{\"role\": \"client\", \"mode\": \"stream\", \"sent_bytes\": %llu, "
	       "\"writes\": %llu, \"elapsed\": %.9f, \"replies\": %llu, \"bad_replies\": %llu, "
	       "\"eagain_read\": %llu, \"eagain_write\": %llu}\n",
	       (unsigned long long)bytes, (unsigned long long)writes, elapsed,
	       (unsigned long long)replies, (unsigned long long)bad_replies,
	       (unsigned long long)eagain_read, (unsigned long long)eagain_write);
	free(per_conn);
	free(buf);
}

static int run_client(const struct opts *o)
{
	int *conns = calloc(o->pairs, sizeof(int)), i;

	if (!conns)
		die("calloc");
	for (i = 0; i < o->pairs; i++)
		conns[i] = connect_socket(o);
	if (o->pingpong)
		client_pingpong(o, conns[0]);
	else
		client_stream(o, conns);
	free(conns);
	return 0;
}

/* ---- command line ------------------------------------------------------ */

static const char *arg_value(int argc, char **argv, int *i)
{
	if (*i + 1 >= argc)
		usage("option without a value");
	return argv[++*i];
}

int main(int argc, char **argv)
{
	struct opts o = { .pairs = 1, .nodelay = 0, .duration = 1.0 };
	int i;

	if (argc < 2)
		usage("server or client?");
	if (!strcmp(argv[1], "server"))
		o.server = 1;
	else if (strcmp(argv[1], "client"))
		usage("first argument must be server or client");
	for (i = 2; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--family")) {
			const char *v = arg_value(argc, argv, &i);

			if (!strcmp(v, "unix"))
				o.unix_family = 1;
			else if (strcmp(v, "tcp"))
				usage("--family must be tcp or unix");
		} else if (!strcmp(a, "--addr")) {
			o.addr = arg_value(argc, argv, &i);
		} else if (!strcmp(a, "--port")) {
			o.port = atoi(arg_value(argc, argv, &i));
		} else if (!strcmp(a, "--mode")) {
			const char *v = arg_value(argc, argv, &i);

			if (!strcmp(v, "pingpong"))
				o.pingpong = 1;
			else if (strcmp(v, "stream"))
				usage("--mode must be stream or pingpong");
		} else if (!strcmp(a, "--size")) {
			o.size = strtoul(arg_value(argc, argv, &i), NULL, 10);
		} else if (!strcmp(a, "--pairs")) {
			o.pairs = atoi(arg_value(argc, argv, &i));
		} else if (!strcmp(a, "--nodelay")) {
			o.nodelay = atoi(arg_value(argc, argv, &i)) ? 1 : 0;
		} else if (!strcmp(a, "--reply")) {
			o.reply = atoi(arg_value(argc, argv, &i)) ? 1 : 0;
		} else if (!strcmp(a, "--duration")) {
			o.duration = atof(arg_value(argc, argv, &i));
		} else {
			usage("unknown option");
		}
	}
	if (!o.addr)
		usage("--addr is required");
	if (!o.size)
		usage("--size must be positive");
	if (o.pairs < 1 || o.pairs > MAX_PAIRS)
		usage("--pairs out of range");
	if (o.pingpong && o.pairs != 1)
		usage("pingpong takes one pair");
	if (o.pingpong && o.reply)
		usage("--reply is for stream mode");
	if (!o.server && !o.unix_family && !o.port)
		usage("client needs --port");
	return o.server ? run_server(&o) : run_client(&o);
}
