/*
 * request.bpf.c: request boundaries for both protocols and the backends' lives.
 *
 * A request runs from the receipt of its first bytes (recvfrom returning data
 * while the backend is idle after ReadyForQuery) to the start of the send
 * that flushes the ReadyForQuery ('Z') message answering it.  In
 * pipeline mode the next request's bytes are already buffered: it starts when
 * the previous request's answer is sent.  Bytes answered without a 'Z' (a
 * Flush read alone) open no request: see recvfrom_exit.  Backends running at
 * attach start from their status entry (resolve_seed in pgtrace.h); a backend
 * exiting inside a request leaves it flagged aborted (abort_request).  The
 * contract: /work/shared/attribution-model.md ("What is attributed").
 * Records are written without wake-ups: pgtrace reads the ring buffer on a
 * timer (pgtrace/collect/ringbuf.py).
 */
#include "pgtrace.h"

static __always_inline void reset_request(struct task_state *st, u64 now)
{
	__builtin_memset(&st->acc, 0, sizeof(st->acc));  /* inline stores, no helper call */
	st->acc.t_start = now;
	st->last_ts = now;
}

static __always_inline void new_task(u32 pid, u64 now)
{
	u32 zero = 0;
	struct task_state *z = zero_state.lookup(&zero);
	if (!z)
		return;
	struct task_state *st = track(pid, z);
	if (!st)
		return;
	st->wal_fd = -1;
	st->init_fd = -1;
	st->recv_fd = -1;
	st->off_ustack = st->off_kstack = -1;
	st->mode = MODE_RUNQ;
	st->last_ts = now;
	st->wake_ts = now;
}

#ifdef MYBEENTRY_ADDR
/*
 * The request's text, from the backend's own PgBackendStatus entry: the
 * statement stays in st_activity_raw while the backend is idle.  MYBEENTRY_ADDR
 * is the runtime address of the MyBEEntry pointer (the same in every forked
 * backend), ACTIVITY_RAW_OFF the field's offset, checked by the loader.  Both
 * pointers are fixed once set (a backend keeps its status slot, and a slot its
 * buffer), so they are read once per backend: one user read per request, not three.
 */
static __always_inline u64 activity_raw(struct task_state *st)
{
	u64 be = 0, raw = st->activity_raw;
	if (!raw) {
		if (bpf_probe_read_user(&be, sizeof(be), (void *)MYBEENTRY_ADDR) != 0 || !be)
			return 0;
		if (bpf_probe_read_user(&raw, sizeof(raw), (void *)(be + ACTIVITY_RAW_OFF)) != 0)
			return 0;
		st->activity_raw = raw;
	}
	return raw;
}

static __always_inline void read_activity(struct task_state *st)
{
	u64 raw = activity_raw(st);
	if (raw)
		bpf_probe_read_user_str(st->acc.query, sizeof(st->acc.query), (void *)raw);
}
#endif

/* Send the request accumulated in st->acc, flagged `flags`. */
static __always_inline void emit_request(struct task_state *st, u64 now, u32 flags)
{
#ifdef MYBEENTRY_ADDR
	read_activity(st);
#endif
	st->acc.t_end = now;
	st->acc.pid = bpf_get_current_pid_tgid();
	st->acc.depth_at_end = st->depth;
	st->acc.flags = flags;
	/* a reservation can fail with room to spare (the ring's lock is a
	 * resilient spinlock since 6.15): try once more, then hand the
	 * record over through a hash map before counting it lost */
	if (events.ringbuf_output(&st->acc, sizeof(st->acc), BPF_RB_NO_WAKEUP) == 0) {
		bump(C_REQUESTS);
	} else if (events.ringbuf_output(&st->acc, sizeof(st->acc), BPF_RB_NO_WAKEUP) == 0) {
		bump(C_RETRIED);
		bump(C_REQUESTS);
	} else {
		u64 key = ((u64)st->acc.pid << 32) | (u32)st->acc.seq;
		if (deferred.update(&key, &st->acc) == 0) {
			bump(C_DEFERRED);
			bump(C_REQUESTS);
		} else {
			bump(C_LOST);
		}
	}
}

/* Start accumulating afresh at `now` (the next request's number kept). */
static __always_inline void restart(struct task_state *st, u64 now)
{
	u64 seq = st->acc.seq;
	reset_request(st, now);
	st->acc.seq = seq;
}

/*
 * A ReadyForQuery goes out: it ends the request (a pipelined one whose bytes
 * were already read starts now, its time counted from this answer on).
 */
static __always_inline void answered(struct task_state *st, u64 now)
{
	u32 flags = st->partial || st->seed == SEED_IDLE ? FLAG_PARTIAL : 0;

	charge(st, now);
	if (st->req == REQ_NONE && st->seed == SEED_UNKNOWN)
		bump(C_PARTIAL);              /* started before attach, state unreadable */
	if (st->req != REQ_NONE) {
		if (flags)
			bump(C_PARTIAL);
		emit_request(st, now, flags);
		st->acc.seq++;
	}
	st->seed = SEED_NONE;
	st->partial = 0;
	st->req = REQ_IDLE;
	restart(st, now);
	st->wake_runq_ns = 0;
}

/*
 * The send that carries ReadyForQuery ends the request as it starts: from then
 * on the client can have its answer (a woken client may even read it before
 * the send returns, or preempt the backend inside it), so what follows is the
 * response's transit, not the request's time.
 *
 * ReadyForQuery flushes its 'Z' message at once, so that send ends with the
 * six bytes 'Z' 0 0 0 5 <status>.  Those bytes are read as sendto enters
 * (a window carried across sends, for a message split over two of them).
 * Where the stream is encrypted (ssl = on), RFQ_UPROBE instead marks the send
 * from a uprobe on ReadyForQuery, at the price of a trap per request.
 */
#ifdef RFQ_UPROBE
int on_ready_for_query(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (st)
		st->ending = 1;
	return 0;
}

static __always_inline void sendto_enter(const u8 *buf, u64 len)
{
	struct task_state *st = current_state();
	if (!st || !st->ending)
		return;
	st->ending = 0;
	answered(st, bpf_ktime_get_ns());
}

static __always_inline void sendto_exit(struct task_state *st, long ret) {}
#else
#define RFQ_HEAD 0x5A00000005ULL        /* 'Z', then the length 5 as int32 */
#define TAIL_MASK 0xFFFFFFFFFFFFULL     /* six bytes */

/* Slide the window of the last six bytes sent over this send's bytes. */
static __always_inline u64 slide_tail(u64 w, const u8 *buf, u64 len)
{
	u8 b[6] = {};
	u32 n, i;

	if (len >= 6) {
		if (bpf_probe_read_user(b, 6, buf + len - 6) != 0)
			return 0;
		n = 6;
	} else {
		n = len;
		if (n == 0 || bpf_probe_read_user(b, n & 7, buf) != 0)
			return w;
	}
#pragma unroll
	for (i = 0; i < 6; i++)
		if (i < n)
			w = (w << 8) | b[i];
	return w & TAIL_MASK;
}

static __always_inline void sendto_enter(const u8 *buf, u64 len)
{
	struct task_state *st = current_state();
	u8 status;

	/* a retry of the ReadyForQuery send (EAGAIN, or the rest of a short
	 * write) already ended its request */
	if (!st || st->resending)
		return;
	st->sent_tail = slide_tail(st->sent_tail, buf, len);
	status = st->sent_tail & 0xff;
	if ((st->sent_tail >> 8) != RFQ_HEAD || (status != 'I' && status != 'T' && status != 'E'))
		return;
	st->resending = 1;
	st->resend_len = len;
	answered(st, bpf_ktime_get_ns());
}

/* The ReadyForQuery send returned: done unless it went out in part or not at all. */
static __always_inline void sendto_exit(struct task_state *st, long ret)
{
	if (ret > 0 && (u64)ret >= st->resend_len)
		st->resending = 0;              /* all of it went out */
	else if (ret > 0)
		st->resend_len -= ret;          /* short write: the rest is sent next */
}
#endif

/* A receive starts: its exit matters (recv_fd marks it). */
static __always_inline void recvfrom_enter(s32 fd)
{
	struct task_state *st = current_state();
	if (st && st->req != REQ_NONE)
		st->recv_fd = fd;
}

/*
 * A receive that finds nothing to read (EAGAIN: the backend is about to wait
 * for its client) inside a request whose backend is still idle by its status
 * entry ends a request that was none: the messages read so far are answered
 * without a ReadyForQuery (a Flush after the Sync psycopg sends when it
 * leaves a pipeline block, a Describe flushed by Flush), for Parse, Bind,
 * Execute, Query and FunctionCall all report the backend running before
 * anything else.  What the backend did for them is not the client's request
 * but part of the gap before the next one: the accumulator goes back to the
 * gap's start, with the dropped part's CPU and run-queue time added to it.
 */
#define EAGAIN_RET (-11)
static __always_inline void drop_unanswered(struct task_state *st)
{
	u64 now = bpf_ktime_get_ns(), start, cpu, runq;

	charge(st, now);
	start = st->acc.t_start - st->acc.idle_ns;
	cpu = st->acc.buckets[B_CPU] + st->acc.ctx_cpu_ns + st->acc.idle_cpu_ns;
	runq = st->acc.buckets[B_RUNQUEUE] + st->acc.idle_runq_ns;
	bump(C_UNANSWERED);
	st->req = REQ_IDLE;
	restart(st, now);
	st->acc.t_start = start;
	st->acc.buckets[B_CPU] = cpu;
	st->acc.buckets[B_RUNQUEUE] = runq;
}

/*
 * A receive returned.  The first bytes read while idle start a request.  The
 * gap since the previous request's end (charged to the idle record's buckets,
 * then dropped) is kept in the new record as idle_ns, idle_cpu_ns and
 * idle_runq_ns: with the requests' own buckets they account for all of a
 * backend's time once it has answered.
 */
static __always_inline void recvfrom_exit(struct task_state *st, long ret)
{
	u64 now, idle = 0, idle_cpu, idle_runq;
	if (st->req == REQ_BUSY && ret == EAGAIN_RET && !st->partial && status_running() == 0) {
		drop_unanswered(st);
		return;
	}
	if (ret <= 0 || st->req != REQ_IDLE)
		return;
	now = bpf_ktime_get_ns();
	charge(st, now);
	if (st->acc.t_start && now > st->acc.t_start)
		idle = now - st->acc.t_start;
	idle_cpu = st->acc.buckets[B_CPU];
	idle_runq = st->acc.buckets[B_RUNQUEUE];
	restart(st, now);
	st->acc.idle_ns = idle;
	st->acc.idle_cpu_ns = idle_cpu;
	st->acc.idle_runq_ns = idle_runq;
	st->acc.wakeup_ns = st->wake_runq_ns;
	st->req = REQ_BUSY;
	st->seed = SEED_NONE;
#ifdef MYBEENTRY_ADDR
	/* once per backend: at an abort its status entry is already gone */
	if (!st->activity_raw)
		activity_raw(st);
#endif
}

/*
 * The backend leaves inside a request: exit_group with a non-zero status
 * (pg_terminate_backend, a FATAL error), or killed without one.  The request
 * is recorded as far as it got, flagged aborted.  exit_group(0) is the clean
 * end after a Terminate.
 */
static __always_inline void abort_request(struct task_state *st)
{
	u64 now = bpf_ktime_get_ns();
	u32 flags = FLAG_ABORTED | (st->partial ? FLAG_PARTIAL : 0);

	charge(st, now);
	bump(C_ABORTED);
	if (st->partial)
		bump(C_PARTIAL);
	emit_request(st, now, flags);
	st->req = REQ_NONE;
	st->partial = 0;
}

static __always_inline void exit_group_enter(long status)
{
	struct task_state *st = current_state();
	if (!st)
		return;
	if (status == 0)
		st->exit_clean = 1;
	else if (st->req == REQ_BUSY)
		abort_request(st);
}

/*
 * pgstat_report_activity(state, cmd_str): keep the first statement's text.
 * Attached only when the text cannot be read from the backend status entry.
 */
int on_report_activity(struct pt_regs *ctx)
{
	struct task_state *st = current_state();
	if (!st || st->req == REQ_NONE || st->acc.query[0] != 0)
		return 0;
	if (PT_REGS_PARM1(ctx) != STATE_RUNNING || PT_REGS_PARM2(ctx) == 0)
		return 0;
	bpf_probe_read_user_str(st->acc.query, sizeof(st->acc.query), (void *)PT_REGS_PARM2(ctx));
	return 0;
}

/*
 * Children of the traced postmaster become traced tasks.  Raw tracepoints, as
 * in sched.bpf.c: (struct task_struct *parent, struct task_struct *child).
 */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	if (POSTMASTER_PID == 0 || pid_of_task((void *)ctx->args[0]) != POSTMASTER_PID)
		return 0;
	new_task(pid_of_task((void *)ctx->args[1]), bpf_ktime_get_ns());
	bump(C_FORKS);
	return 0;
}

/* (struct task_struct *p, ...): the exiting task is the current one */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	u32 pid = bpf_get_current_pid_tgid();
	struct task_state *st = state_of(pid);
	if (!st)
		return 0;
	if (st->req == REQ_BUSY && !st->exit_clean)
		abort_request(st);      /* killed: no exit_group (its text may be gone) */
	untrack(pid);
	return 0;
}
