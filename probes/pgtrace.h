/*
 * pgtrace.h: event and per-task state shared by all pgtrace BPF programs.
 *
 * One translation unit: the loader concatenates the *.bpf.c files it needs and
 * passes constants as -D flags (see pgtrace/collect/loader.py).  The Python
 * mirror of every struct here is pgtrace/collect/events.py, checked by a test
 * against what bcc compiled.
 */
#ifndef PGTRACE_H
#define PGTRACE_H

#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

/* ---- constants the loader must pass ------------------------------------ */
#ifndef POSTMASTER_PID
#define POSTMASTER_PID 0          /* 0: follow no forks (explicit backend pids) */
#endif
#ifndef QUERY_LEN
#define QUERY_LEN 128             /* bytes of query text kept for fingerprinting */
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024
#endif
#ifndef STATE_RUNNING
#define STATE_RUNNING 2           /* BackendState STATE_RUNNING (utils/backend_status.h) */
#endif
#ifndef WAL_WRITE_IS_SYNC
#define WAL_WRITE_IS_SYNC 0       /* wal_sync_method open_datasync/open_sync */
#endif
#ifndef WAL_FLUSH_IS_FSYNC
#define WAL_FLUSH_IS_FSYNC 0      /* wal_sync_method fsync: the flush is fsync(), not fdatasync() */
#endif
#ifndef CLIENT_RINGBUF_PAGES
#define CLIENT_RINGBUF_PAGES 256
#endif
#ifndef STACK_ENTRIES
#define STACK_ENTRIES 16384
#endif
#ifndef MAX_TASKS
#define MAX_TASKS 16384           /* traced tasks whose state slot was taken (the spill map) */
#endif
#ifndef TASK_PID_OFF
/* from the running kernel's BTF: the headers may be another build's (loader.py) */
#error "TASK_PID_OFF (the offset of task_struct.pid) must be passed"
#endif
#ifndef STATE_SLOTS
#define STATE_SLOTS 8192          /* power of two: task states at pid & (STATE_SLOTS - 1) */
#endif


/* ---- buckets: indices into req_event.buckets (mirrored in pgtrace/model.py) */
#define B_CPU 0
#define B_RUNQUEUE 1
#define B_FSYNC 2
#define B_WAL_WRITE 3
#define B_LWLOCK 4
#define B_LOCK 5
#define B_IO_READ 6
#define B_IO_WRITE 7
#define B_OTHER_WAIT 8
#define NBUCKETS 9

/* wait contexts; the innermost one names the bucket of blocked/on-CPU time */
#define CTX_NONE 0
#define CTX_FSYNC 1
#define CTX_WAL_WRITE 2
#define CTX_LWLOCK 3
#define CTX_LOCK 4
#define CTX_IO_READ 5
#define CTX_IO_WRITE 6
#define NCTX 7
#define MAXDEPTH 4

/* scheduler mode of a traced task */
#define MODE_ONCPU 0
#define MODE_RUNQ 1
#define MODE_BLOCKED 2

/* request state of a traced task */
#define REQ_NONE 0   /* unknown: startup, or attached mid-request */
#define REQ_IDLE 1   /* ReadyForQuery sent; the next bytes received start a request */
#define REQ_BUSY 2

/* counters: indices into the per-CPU `counters` array (mirrored in events.py) */
#define C_REQUESTS 0
#define C_LOST 1          /* ring buffer full: request record dropped */
#define C_UNMATCHED 2     /* a wait "done" without its "start" */
#define C_OVERFLOW 3      /* wait contexts nested deeper than MAXDEPTH */
#define C_ABORTED 4       /* backend exited inside a request */
#define C_FORKS 5
#define C_BADARG 6        /* a USDT site whose argument spec was unknown */
#define C_RETRIED 7       /* a record written on the second try */
#define C_DEFERRED 8      /* a record handed over through the `deferred` map */
#define C_CLIENT_LOST 9   /* a driver run-queue wait the ring buffer refused */
#define C_RESYNCED 10     /* a running task whose switch-in the sched programs missed */
#define NCOUNTERS 11

#define NLW 4             /* LWLock tranches kept per request; more go to lw_other_ns */
#define NLOCKTYPES 12     /* LockTagType values (storage/lock.h), the last one = other */

#define ARG_REG 1
#define ARG_MEM 2
#define ARG_CONST 3

struct lw_slot {
	u64 tranche;          /* address of the tranche name in the server's memory */
	u64 ns;
	u32 count;
	u32 pad;
};

/* One record per request: what leaves the kernel. */
struct req_event {
	u64 t_start;          /* CLOCK_MONOTONIC ns: request bytes received */
	u64 t_end;            /* ReadyForQuery sent */
	u64 wakeup_ns;        /* run-queue wait of the wake-up that delivered the request */
	u64 seq;              /* per-backend request number */
	u32 pid;
	u32 depth_at_end;     /* wait contexts still open at the end (0 expected) */
	u64 buckets[NBUCKETS];
	struct lw_slot lw[NLW];
	u64 lw_other_ns;
	u64 lock_ns[NLOCKTYPES];
	u32 n_lwlock;
	u32 n_lock;
	u32 n_fsync;
	u32 n_wal_write;
	u32 n_read;
	u32 n_write;
	u32 n_vcsw;           /* voluntary context switches */
	u32 n_ivcsw;          /* preemptions */
	u64 rq_ctx[NCTX];     /* runqueue split by the context it interrupted (CTX_*) */
	u64 ctx_cpu_ns;       /* on CPU inside a wait context (part of that context's bucket) */
	u64 idle_ns;          /* the gap before it: since the previous request's end (0: none) */
	u64 idle_cpu_ns;      /* of that gap: on CPU */
	u64 idle_runq_ns;     /* of that gap: waiting for a CPU (the wake-up's wait among it) */
	char query[QUERY_LEN];
};

/* A checkpoint of the traced cluster: [start, end), end 0 while it runs. */
struct checkpoint_span {
	u64 start;
	u64 end;
};
#define NCHECKPOINTS 64

/* A run-queue wait of a driver (client) thread: [start, end). */
struct runq_event {
	u64 start;
	u64 end;
	u32 pid;
	u32 pad;
};

/* who opened a wait context, and so who closes it */
#define ORIGIN_PROBE 0    /* a USDT start probe: its done probe */
#define ORIGIN_SYSCALL 1  /* a syscall enter: its exit */
#define ORIGIN_SCHED 2    /* a switch-out, from the wait event: the switch-in */

struct ctx_entry {
	u64 tranche;          /* LWLock: TRANCHE_ID_FLAG | tranche id, or the name's address */
	u8 kind;
	u8 locktype;
	u8 origin;
	u8 pad[5];
};

/* tranche ids (from wait_event_info) vs name addresses (USDT argument) */
#define TRANCHE_ID_FLAG (1ULL << 63)

struct task_state {
	u64 last_ts;          /* last time charged */
	u64 wake_ts;          /* when the last wake-up made it runnable */
	u64 wake_runq_ns;     /* run-queue wait of that wake-up, once it ran */
	s32 wal_fd;           /* fd of the open WAL segment, -1 if none */
	s32 init_fd;          /* fd of a WAL segment being created (xlogtemp.*), -1 if none */
	u8 mode;
	u8 req;
	u8 depth;
	u8 overflow;
	u8 opening_wal;       /* 1: opening a WAL segment, 2: a new one (xlogtemp.*) */
	u8 ending;            /* inside ReadyForQuery: its send ends the request */
	u8 is_client;         /* a driver thread: report its run-queue waits */
	u8 resending;         /* a send that carried ReadyForQuery is not complete yet */
	u32 pid;              /* the task this state belongs to (0: a free slot) */
	u64 sent_tail;        /* the last 6 bytes sent, big-endian in the low 48 bits */
	u64 resend_len;       /* bytes of that send still to go out */
	u64 activity_raw;     /* the backend's st_activity_raw, once read (fixed for its life) */
	u64 wait_event_ptr;   /* its my_wait_event_info target, once read after a request */
	s32 off_ustack;       /* with stacks: user stack where it last blocked */
	s32 off_kstack;       /* with stacks: kernel stack where it last blocked */
	struct ctx_entry stack[MAXDEPTH];
	struct req_event acc;
};

struct argspec {
	s64 off;              /* memory displacement or constant */
	u8 kind;
	u8 size;
	u8 is_signed;
	u8 reg;               /* index of the register in struct pt_regs, as u64 words */
	u32 pad;
};

struct argkey {
	u64 ip;               /* runtime address of the USDT site */
	u32 argno;            /* 0-based */
	u32 pad;
};

/*
 * Traced tasks.  A task's state lives in `states` at its pid's slot, found
 * with one array lookup: every context switch and traced syscall of every
 * process looks a pid up, and a hash lookup costs several times as much.  A
 * pid whose slot is taken spills into the `tasks` hash; `spills` counts them
 * per slot, so that a pid that is not traced costs no hash lookup.
 */
BPF_ARRAY(states, struct task_state, STATE_SLOTS);
BPF_ARRAY(spills, u32, STATE_SLOTS);
BPF_HASH(tasks, u32, struct task_state, MAX_TASKS);
BPF_PERCPU_ARRAY(counters, u64, NCOUNTERS);
BPF_ARRAY(zero_state, struct task_state, 1);
BPF_HASH(usdt_args, struct argkey, struct argspec, 1024);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_RINGBUF_OUTPUT(client_runq, CLIENT_RINGBUF_PAGES);
/* records the ring buffer refused: pgtrace reads and deletes them, key pid<<32|seq */
BPF_HASH(deferred, u64, struct req_event, 1024);
/* never written: lets the loader compare bcc's layout with events.py */
BPF_ARRAY(layout_req_event, struct req_event, 1);
BPF_ARRAY(layout_runq_event, struct runq_event, 1);
/* the last NCHECKPOINTS checkpoints, slot = number % NCHECKPOINTS; slot NCHECKPOINTS counts */
BPF_ARRAY(checkpoints, struct checkpoint_span, NCHECKPOINTS + 1);

static __always_inline void bump(u32 idx)
{
	u64 *c = counters.lookup(&idx);
	if (c)
		(*c)++;
}


/* The pid (thread id) of a task the raw tracepoints handed over. */
static __always_inline u32 pid_of_task(void *task)
{
	u32 pid = 0;
	bpf_probe_read_kernel(&pid, sizeof(pid), (u8 *)task + TASK_PID_OFF);
	return pid;
}

/* The state of a traced task, or NULL. */
static __always_inline struct task_state *state_of(u32 pid)
{
	u32 slot = pid & (STATE_SLOTS - 1);
	struct task_state *st;
	u32 *n;

	if (pid == 0)
		return NULL;
	st = states.lookup(&slot);
	if (st && st->pid == pid)
		return st;
	n = spills.lookup(&slot);
	if (!n || *n == 0)
		return NULL;
	return tasks.lookup(&pid);
}

/* Start tracing `pid` with state `init`; NULL if there is no room. */
static __always_inline struct task_state *track(u32 pid, struct task_state *init)
{
	u32 slot = pid & (STATE_SLOTS - 1);
	struct task_state *st = states.lookup(&slot);
	u32 *n;

	if (!st)
		return NULL;
	if (st->pid == 0 || st->pid == pid) {
		bpf_probe_read_kernel(st, sizeof(*st), init);
		st->pid = pid;
		return st;
	}
	n = spills.lookup(&slot);
	if (!n || tasks.update(&pid, init) != 0)
		return NULL;
	__sync_fetch_and_add(n, 1);
	st = tasks.lookup(&pid);
	if (st)
		st->pid = pid;
	return st;
}

static __always_inline void untrack(u32 pid)
{
	u32 slot = pid & (STATE_SLOTS - 1);
	struct task_state *st = states.lookup(&slot);
	u32 *n;

	if (st && st->pid == pid) {
		st->pid = 0;
		return;
	}
	if (tasks.delete(&pid) == 0) {
		n = spills.lookup(&slot);
		if (n)
			__sync_fetch_and_add(n, -1);
	}
}

/* The bucket the time since last_ts belongs to. */
static __always_inline u32 bucket_of(struct task_state *st, u8 *kind)
{
	u8 depth = st->depth;
	*kind = CTX_NONE;
	if (depth > 0 && depth <= MAXDEPTH)
		*kind = st->stack[(depth - 1) & (MAXDEPTH - 1)].kind;
	if (st->mode == MODE_RUNQ)
		return B_RUNQUEUE;
	switch (*kind) {
	case CTX_FSYNC: return B_FSYNC;
	case CTX_WAL_WRITE: return B_WAL_WRITE;
	case CTX_LWLOCK: return B_LWLOCK;
	case CTX_LOCK: return B_LOCK;
	case CTX_IO_READ: return B_IO_READ;
	case CTX_IO_WRITE: return B_IO_WRITE;
	}
	return st->mode == MODE_ONCPU ? B_CPU : B_OTHER_WAIT;
}

#ifdef WITH_STACKS
/* Stacks for flame graphs (stacks.bpf.c): on-CPU samples, off-CPU time by bucket. */
struct stack_key {
	s32 ustack;
	s32 kstack;
	u32 bucket;           /* off-CPU: the bucket the blocked time went to */
	u32 pad;
};
BPF_STACK_TRACE(stack_traces, STACK_ENTRIES);
BPF_HASH(oncpu_samples, struct stack_key, u64, 16384);
BPF_HASH(offcpu_ns, struct stack_key, u64, 16384);

static __always_inline void charge_offcpu(struct task_state *st, u32 bucket, u64 delta)
{
	struct stack_key key = {};
	key.ustack = st->off_ustack;
	key.kstack = st->off_kstack;
	key.bucket = bucket;
	u64 *v = offcpu_ns.lookup_or_try_init(&key, &(u64){0});
	if (v)
		__sync_fetch_and_add(v, delta);
}
#endif

static __always_inline void charge_lwlock(struct task_state *st, u64 tranche, u64 delta)
{
	int i;
#pragma unroll
	for (i = 0; i < NLW; i++) {
		if (st->acc.lw[i].tranche == tranche) {
			st->acc.lw[i].ns += delta;
			return;
		}
		if (st->acc.lw[i].tranche == 0) {
			st->acc.lw[i].tranche = tranche;
			st->acc.lw[i].ns = delta;
			return;
		}
	}
	st->acc.lw_other_ns += delta;
}

/* Put the time since the last event into its bucket. */
static __always_inline void charge(struct task_state *st, u64 now)
{
	u64 delta;
	u8 kind;
	u32 b;

	if (st->req == REQ_NONE || now <= st->last_ts) {
		st->last_ts = now > st->last_ts ? now : st->last_ts;
		return;
	}
	delta = now - st->last_ts;
	st->last_ts = now;
	b = bucket_of(st, &kind);
	if (b >= NBUCKETS)
		return;
	st->acc.buckets[b] += delta;
	if (st->mode == MODE_ONCPU && b != B_CPU)
		st->acc.ctx_cpu_ns += delta;
#ifdef WITH_STACKS
	/* not while idle: that wait is the client's, discarded when bytes arrive */
	if (st->mode == MODE_BLOCKED && st->req == REQ_BUSY)
		charge_offcpu(st, b, delta);
#endif
	if (b == B_RUNQUEUE) {
		/* constant indices: the verifier cannot follow a clamped one here */
		switch (kind) {
		case CTX_FSYNC: st->acc.rq_ctx[CTX_FSYNC] += delta; break;
		case CTX_WAL_WRITE: st->acc.rq_ctx[CTX_WAL_WRITE] += delta; break;
		case CTX_LWLOCK: st->acc.rq_ctx[CTX_LWLOCK] += delta; break;
		case CTX_LOCK: st->acc.rq_ctx[CTX_LOCK] += delta; break;
		case CTX_IO_READ: st->acc.rq_ctx[CTX_IO_READ] += delta; break;
		case CTX_IO_WRITE: st->acc.rq_ctx[CTX_IO_WRITE] += delta; break;
		default: st->acc.rq_ctx[CTX_NONE] += delta; break;
		}
		return;
	}
	if (b == B_LWLOCK || b == B_LOCK) {
		u8 d = (st->depth - 1) & (MAXDEPTH - 1);
		if (b == B_LWLOCK) {
			charge_lwlock(st, st->stack[d].tranche, delta);
		} else {
			u8 t = st->stack[d].locktype;
			if (t >= NLOCKTYPES)
				t = NLOCKTYPES - 1;
			st->acc.lock_ns[t & 15] += delta;
		}
	}
}

static __always_inline void push_ctx(struct task_state *st, u8 kind, u64 tranche, u8 locktype,
				     u8 origin)
{
	u8 d = st->depth;
	if (d >= MAXDEPTH) {
		st->overflow++;
		bump(C_OVERFLOW);
		return;
	}
	st->stack[d & (MAXDEPTH - 1)].kind = kind;
	st->stack[d & (MAXDEPTH - 1)].tranche = tranche;
	st->stack[d & (MAXDEPTH - 1)].locktype = locktype;
	st->stack[d & (MAXDEPTH - 1)].origin = origin;
	st->depth = d + 1;
}

static __always_inline void pop_ctx(struct task_state *st, u8 kind)
{
	u8 d = st->depth;
	if (st->overflow) {
		st->overflow--;
		return;
	}
	if (d == 0 || st->stack[(d - 1) & (MAXDEPTH - 1)].kind != kind) {
		bump(C_UNMATCHED);
		/* drop a stale context of this kind deeper down, keep the rest */
		if (d > 0)
			st->depth = d - 1;
		return;
	}
	st->depth = d - 1;
}

/* Enter a wait context: charge what came before it, then push. */
static __always_inline void enter_ctx(struct task_state *st, u8 kind, u64 tranche, u8 locktype)
{
	charge(st, bpf_ktime_get_ns());
	push_ctx(st, kind, tranche, locktype, ORIGIN_PROBE);
}

/* A syscall's context: its exit pops it only if its enter pushed it. */
static __always_inline void enter_syscall_ctx(struct task_state *st, u8 kind)
{
	charge(st, bpf_ktime_get_ns());
	push_ctx(st, kind, 0, 0, ORIGIN_SYSCALL);
}

/* Whether the innermost open context was opened by `origin`. */
static __always_inline int top_is(struct task_state *st, u8 origin)
{
	if (st->depth == 0 || st->depth > MAXDEPTH || st->overflow)
		return 0;
	return st->stack[(st->depth - 1) & (MAXDEPTH - 1)].origin == origin;
}

static __always_inline void leave_ctx(struct task_state *st, u8 kind)
{
	charge(st, bpf_ktime_get_ns());
	pop_ctx(st, kind);
}

/*
 * Task state of the current thread, if it is traced.  The thread is running:
 * if its state says otherwise, its switch-in was missed (the kernel skips a
 * BPF program that would nest in another on the same CPU), so catch up here.
 */
static __always_inline struct task_state *current_state(void)
{
	struct task_state *st = state_of(bpf_get_current_pid_tgid());
	if (st && st->mode != MODE_ONCPU) {
		charge(st, bpf_ktime_get_ns());
		st->mode = MODE_ONCPU;
		if (top_is(st, ORIGIN_SCHED))
			st->depth--;
		if (st->req == REQ_BUSY)
			bump(C_RESYNCED);
	}
	return st;
}

/* Read one register of pt_regs by its index (struct pt_regs as u64 words). */
#define NREGS (sizeof(struct pt_regs) / sizeof(u64))
static __always_inline u64 reg_value(struct pt_regs *ctx, u8 reg)
{
	u64 regs[NREGS];
	if (bpf_probe_read_kernel(regs, sizeof(regs), ctx) != 0 || reg >= NREGS)
		return 0;
	return regs[reg];
}

/* Argument argno of the USDT site being hit, as the notes describe it. */
static __always_inline u64 usdt_arg(struct pt_regs *ctx, u32 argno)
{
	struct argkey key = {};
	struct argspec *spec;
	u64 v = 0;

	key.ip = PT_REGS_IP(ctx);
	key.argno = argno;
	spec = usdt_args.lookup(&key);
	if (!spec) {
		bump(C_BADARG);
		return 0;
	}
	if (spec->kind == ARG_CONST)
		return spec->off;
	v = reg_value(ctx, spec->reg);
	if (spec->kind == ARG_MEM) {
		u64 addr = v + spec->off;
		v = 0;
		switch (spec->size) {
		case 1: { u8 x = 0; bpf_probe_read_user(&x, 1, (void *)addr); v = x; break; }
		case 2: { u16 x = 0; bpf_probe_read_user(&x, 2, (void *)addr); v = x; break; }
		case 4: { u32 x = 0; bpf_probe_read_user(&x, 4, (void *)addr); v = x; break; }
		default: bpf_probe_read_user(&v, 8, (void *)addr); break;
		}
	}
	switch (spec->size) {
	case 1: v &= 0xff; break;
	case 2: v &= 0xffff; break;
	case 4: v &= 0xffffffff; break;
	}
	return v;
}

#endif /* PGTRACE_H */
