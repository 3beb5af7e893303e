/*
 * request.bpf.c: request boundaries for both protocols and the backends' lives.
 *
 * A request runs from the receipt of its first bytes (recvfrom returning data
 * while the backend is idle after ReadyForQuery) to the start of the send
 * that flushes the ReadyForQuery ('Z') message answering it.  In
 * pipeline mode the next request's bytes are already buffered: it starts when
 * the previous request's answer is sent.  Records are written without wake-ups:
 * pgtrace reads the ring buffer on a timer (pgtrace/collect/ringbuf.py).
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
static __always_inline void read_activity(struct task_state *st)
{
	u64 be = 0, raw = st->activity_raw;
	if (!raw) {
		if (bpf_probe_read_user(&be, sizeof(be), (void *)MYBEENTRY_ADDR) != 0 || !be)
			return;
		if (bpf_probe_read_user(&raw, sizeof(raw), (void *)(be + ACTIVITY_RAW_OFF)) != 0 ||
		    !raw)
			return;
		st->activity_raw = raw;
	}
	bpf_probe_read_user_str(st->acc.query, sizeof(st->acc.query), (void *)raw);
}
#endif

/* Emit the request and start waiting for the next one. */
static __always_inline void end_request(struct task_state *st, u64 now)
{
	u64 seq;
	charge(st, now);
	if (st->req != REQ_NONE) {
#ifdef MYBEENTRY_ADDR
		read_activity(st);
#endif
		st->acc.t_end = now;
		st->acc.pid = bpf_get_current_pid_tgid();
		st->acc.depth_at_end = st->depth;
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
	seq = st->acc.seq + 1;
	reset_request(st, now);
	st->acc.seq = seq;
	st->req = REQ_IDLE;
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
	end_request(st, bpf_ktime_get_ns());
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
	end_request(st, bpf_ktime_get_ns());
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

/*
 * The first bytes read while idle start a request.  The gap since the previous
 * request's end (charged to the idle record's buckets, then dropped) is kept in
 * the new record as idle_ns, idle_cpu_ns and idle_runq_ns: with the requests'
 * own buckets they account for all of a backend's time once it has answered.
 */
static __always_inline void recvfrom_exit(struct task_state *st, long ret)
{
	u64 now, seq, idle = 0, idle_cpu, idle_runq;
	if (ret <= 0)
		return;
	now = bpf_ktime_get_ns();
	charge(st, now);
	if (st->acc.t_start && now > st->acc.t_start)
		idle = now - st->acc.t_start;
	idle_cpu = st->acc.buckets[B_CPU];
	idle_runq = st->acc.buckets[B_RUNQUEUE];
	seq = st->acc.seq;
	reset_request(st, now);
	st->acc.seq = seq;
	st->acc.idle_ns = idle;
	st->acc.idle_cpu_ns = idle_cpu;
	st->acc.idle_runq_ns = idle_runq;
	st->acc.wakeup_ns = st->wake_runq_ns;
	st->req = REQ_BUSY;
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
	if (st->req == REQ_BUSY)
		bump(C_ABORTED);
	untrack(pid);
	return 0;
}
