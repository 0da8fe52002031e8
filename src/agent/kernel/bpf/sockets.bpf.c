// A BPF task_file iterator: for every open file of every process that is an IPv4 or IPv6 TCP socket, one fixed-size
// record (struct record below, parsed by record.rs) with the socket's addresses, state, keepalive settings, network
// namespace and holder. Read-only: it reads kernel memory and writes to the iterator's output, nothing else.
//
// Built by build.rs with clang alone (-target bpfel, or bpfeb on big-endian machines): no kernel headers, no libbpf.
// The kernel structures are declared here with only the fields read, marked preserve_access_index, so every field
// offset is a CO-RE relocation that the loader (aya) resolves against the running kernel's BTF
// (/sys/kernel/btf/vmlinux): the object is built once and runs on any kernel with BTF and bpf_sock_from_file (Linux
// 5.11 and later).
//
// The task's, the file's and struct sock's fields are read by plain loads, which the verifier checks against the
// kernel's BTF and makes fault-safe. tcp_sock's and inet_connection_sock's fields lie past the end of struct sock,
// where it refuses plain loads, and bpf_skc_to_tcp_sock refuses sock->sk (an untrusted pointer): those four are
// read with bpf_probe_read_kernel.

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define CORE __attribute__((preserve_access_index))

// Helper numbers are the kernel's stable ABI (enum bpf_func_id in include/uapi/linux/bpf.h).
static long (*bpf_probe_read_kernel)(void *dst, __u32 size, const void *unsafe_ptr) = (void *)113;
struct seq_file;
static long (*bpf_seq_write)(struct seq_file *m, const void *data, __u32 len) = (void *)127;
struct file;
struct socket;
static struct socket *(*bpf_sock_from_file)(struct file *file) = (void *)162;

// Only the fields read, with the kernel's names; offsets come from the kernel's BTF at load time.
struct bpf_iter_meta {
	struct seq_file *seq;
} CORE;

struct task_struct {
	int tgid;
	char comm[16];
} CORE;

struct inode {
	unsigned long i_ino;
} CORE;

struct file {
	struct inode *f_inode;
} CORE;

struct socket {
	struct sock *sk;
} CORE;

struct ns_common {
	unsigned int inum;
} CORE;

struct net {
	struct ns_common ns;
} CORE;

struct in6_addr {
	__u8 bytes[16];
};

// The fields below sit in anonymous unions and structs of the kernel's struct sock_common; CO-RE finds them by name.
struct sock_common {
	__u32 skc_daddr;
	__u32 skc_rcv_saddr;
	__u16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct {
		struct net *net;
	} skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	unsigned long skc_flags;
} CORE;

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
	__u16 sk_type;
} CORE;

struct inet_connection_sock {
	__u32 icsk_user_timeout;
} CORE;

struct tcp_sock {
	__u8 keepalive_probes;
	unsigned int keepalive_time;
	unsigned int keepalive_intvl;
} CORE;

// The iterator's context (the arguments of bpf_iter_task_file: a fixed ABI, 8 bytes each).
struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	__u32 fd;
	struct file *file;
};

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define SOCK_STREAM 1
// enum sock_flags: SO_KEEPALIVE sets this bit of skc_flags.
#define SOCK_KEEPOPEN 3

#define RECORD_MAGIC 0x314b5053 // "SPK1" read little-endian: the layout's version

// One record per (process, descriptor) holding a TCP socket: 96 bytes in the machine's byte order, no implicit padding.
// record.rs parses exactly this layout; change both together (and RECORD_MAGIC).
struct record {
	__u32 magic;            //  0
	__u32 pid;              //  4 tgid
	__u64 inode;            //  8 the socket's inode (socket:[N])
	__u32 netns;            // 16 the network namespace's inode
	__u32 fd;               // 20
	__u32 keepalive_time;   // 24 jiffies; 0 = the namespace's sysctl
	__u32 keepalive_intvl;  // 28 jiffies; 0 = the namespace's sysctl
	__u32 user_timeout;     // 32 milliseconds
	__u16 family;           // 36
	__u16 local_port;       // 38 host order
	__u16 remote_port;      // 40 network order, as the kernel keeps it
	__u8 state;             // 42 TCP state (1 = ESTABLISHED)
	__u8 keepalive;         // 43 SO_KEEPALIVE
	__u8 probes;            // 44 0 = the namespace's sysctl
	__u8 pad[3];            // 45
	__u8 local[16];         // 48 IPv4: the first 4 bytes
	__u8 remote[16];        // 64
	char comm[16];          // 80
};

_Static_assert(sizeof(struct record) == 96, "record.rs expects 96-byte records");

#define READ(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), (const void *)&(src))

SEC("iter/task_file")
int tcp_sockets(struct bpf_iter__task_file *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	if (!task || !file)
		return 0;

	struct socket *socket = bpf_sock_from_file(file);
	if (!socket)
		return 0;
	struct sock *sk = socket->sk;
	if (!sk)
		return 0;

	struct record r;
	__builtin_memset(&r, 0, sizeof(r));
	r.family = sk->__sk_common.skc_family;
	if (r.family != AF_INET && r.family != AF_INET6)
		return 0;
	if (sk->sk_protocol != IPPROTO_TCP || sk->sk_type != SOCK_STREAM)
		return 0;

	r.magic = RECORD_MAGIC;
	r.fd = ctx->fd;
	r.pid = task->tgid;
	__builtin_memcpy(r.comm, task->comm, sizeof(r.comm));
	struct inode *inode = file->f_inode;
	if (inode)
		r.inode = inode->i_ino;

	r.state = sk->__sk_common.skc_state;
	r.keepalive = (sk->__sk_common.skc_flags >> SOCK_KEEPOPEN) & 1;
	r.local_port = sk->__sk_common.skc_num;
	r.remote_port = sk->__sk_common.skc_dport;
	if (r.family == AF_INET) {
		__builtin_memcpy(r.local, &sk->__sk_common.skc_rcv_saddr, 4);
		__builtin_memcpy(r.remote, &sk->__sk_common.skc_daddr, 4);
	} else {
		__builtin_memcpy(r.local, &sk->__sk_common.skc_v6_rcv_saddr, 16);
		__builtin_memcpy(r.remote, &sk->__sk_common.skc_v6_daddr, 16);
	}
	struct net *net = sk->__sk_common.skc_net.net;
	if (net)
		r.netns = net->ns.inum;

	// The socket is TCP (checked above): sk is the start of its tcp_sock.
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	READ(r.keepalive_time, tp->keepalive_time);
	READ(r.keepalive_intvl, tp->keepalive_intvl);
	READ(r.probes, tp->keepalive_probes);
	struct inet_connection_sock *icsk = (struct inet_connection_sock *)sk;
	READ(r.user_timeout, icsk->icsk_user_timeout);

	bpf_seq_write(seq, &r, sizeof(r));
	return 0;
}

// GPL-compatible: bpf_seq_write and bpf_probe_read_kernel are GPL-only helpers.
char LICENSE[] SEC("license") = "Dual MIT/GPL";
