/*
 * pgtrace.h: maps and helpers shared by all pgtrace BPF programs.
 *
 * One translation unit: the loader inlines the generated ABI (constants and
 * record structs, defined once in pgtrace/collect/events.py), this file, then
 * the *.bpf.c files, and passes the configuration as -D flags (see
 * pgtrace/collect/loader.py), which compares the compiled layout of every
 * map with the Python mirror at every attach.
 */
#ifndef PGTRACE_H
#define PGTRACE_H

#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#ifndef PGTRACE_ABI_H
#error "the loader inlines the generated ABI (pgtrace/collect/events.py abi_header) first"
#endif

/* ---- constants the loader passes as -D flags (loader.py ProgramConfig.cflags) -------- */
#if !defined(POSTMASTER_PID) || !defined(QUERY_LEN) || !defined(RINGBUF_PAGES) || \
    !defined(CLIENT_RINGBUF_PAGES) || !defined(STATE_SLOTS) || !defined(STATE_RUNNING) || \
    !defined(WAL_WRITE_IS_SYNC) || !defined(WAL_FLUSH_IS_FSYNC)
#error "POSTMASTER_PID, QUERY_LEN, RINGBUF_PAGES, CLIENT_RINGBUF_PAGES, STATE_SLOTS, STATE_RUNNING, WAL_WRITE_IS_SYNC and WAL_FLUSH_IS_FSYNC must be passed"
#endif
/*
 * POSTMASTER_PID: 0 follows no forks; QUERY_LEN: bytes of query text kept;
 * STATE_SLOTS: a power of two, task states at pid & (STATE_SLOTS - 1);
 * STATE_RUNNING: BackendState STATE_RUNNING (utils/backend_status.h);
 * WAL_WRITE_IS_SYNC: wal_sync_method open_datasync/open_sync;
 * WAL_FLUSH_IS_FSYNC: wal_sync_method fsync, the flush is fsync(), not fdatasync().
 */
#ifndef TASK_PID_OFF
/* from the running kernel's BTF: the headers may be another build's (loader.py) */
#error "TASK_PID_OFF (the offset of task_struct.pid) must be passed"
#endif
#define STACK_ENTRIES 16384
#define MAX_TASKS 16384           /* traced tasks whose state slot was taken (the spill map) */

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
/* never written: lets the loader compare the compiled record layouts with events.py */
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
 * Whether the backend's status entry says it is running a statement
 * (STATE_RUNNING, or STATE_FASTPATH two after it): 1, 0, or -1 unreadable
 * (no status entry address, or track_activities off: STATE_DISABLED).
 */
static __always_inline int status_running(void)
{
	s32 state = -1;
#ifdef MYBEENTRY_ADDR
	u64 be = 0;
	if (bpf_probe_read_user(&be, sizeof(be), (void *)MYBEENTRY_ADDR) == 0 && be)
		bpf_probe_read_user(&state, sizeof(state), (void *)(be + ACTIVITY_RAW_OFF - 16));
#endif
	if (state == STATE_RUNNING || state == STATE_RUNNING + 2)
		return 1;
	if (state == STATE_RUNNING - 1 || state == STATE_RUNNING + 1 || state == STATE_RUNNING + 3)
		return 0;
	return -1;
}

/*
 * A backend running at attach starts in the state its PgBackendStatus entry
 * gives, read at its first event in its own context (so no state change of
 * its can slip between the read and the tracing): idle (in transaction or
 * not) starts idle; running or fastpath starts a request flagged partial,
 * timed from attach.  st_state is the field 16 bytes before st_activity_raw
 * (st_appname between them) in 13 to 18; activity.py checks it on live
 * backends before MYBEENTRY_ADDR is passed.
 */
static __always_inline void resolve_seed(struct task_state *st)
{
	int running = status_running();
	if (running == 1) {
		st->seed = SEED_NONE;
		st->req = REQ_BUSY;
		st->partial = 1;
	} else if (running == 0) {
		st->seed = SEED_IDLE;
		st->req = REQ_IDLE;
	} else {
		st->seed = SEED_UNKNOWN;
		st->req = REQ_NONE;
	}
}

/*
 * Task state of the current thread, if it is traced.  The thread is running:
 * if its state says otherwise, its switch-in was missed (the kernel skips a
 * BPF program that would nest in another on the same CPU), so catch up here.
 */
static __always_inline struct task_state *current_state(void)
{
	struct task_state *st = state_of(bpf_get_current_pid_tgid());
	if (st && st->seed == SEED_PENDING)
		resolve_seed(st);
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
