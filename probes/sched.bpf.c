/*
 * sched.bpf.c: on CPU, waiting for a CPU (runqueue), or blocked.
 *
 * sched_switch charges the time before it and sets the mode from prev_state:
 * a task switched out while runnable (preempted, or still TASK_RUNNING) waits
 * in the run queue; any other state blocks.
 * sched_wakeup ends a block; the next switch-in ends the run-queue wait.
 * Driver threads (is_client) report each run-queue wait as an interval.
 *
 * With MY_WAIT_EVENT_INFO_ADDR (the runtime address of the backend's
 * my_wait_event_info pointer), a backend that blocks outside any other wait
 * context is classified by the wait event it published before sleeping:
 * LWLock waits (with their tranche id), heavyweight locks and I/O waits open a
 * context that its next switch-in closes, so the run-queue wait after the
 * wake-up is split under that context too.  This costs two reads of user
 * memory per sleep instead of two uprobe traps per LWLock wait.
 *
 * These are raw tracepoints: the program gets the tracepoint's own arguments
 * (task pointers), where a perf tracepoint would first fill a perf record for
 * every context switch in the system.  They are invisible to other perf users
 * of the same tracepoints, and close with their file descriptors.
 */
#include "pgtrace.h"

#define TASK_REPORT_BITS 0x7f

#ifdef MY_WAIT_EVENT_INFO_ADDR
#define PG_WAIT_CLASS_MASK 0xFF000000U
#define PG_WAIT_ID_MASK 0x0000FFFFU
#define PG_WAIT_LWLOCK 0x01000000U
#define PG_WAIT_LOCK 0x03000000U
#define PG_WAIT_IO 0x0A000000U

/* IO-class wait event id -> CTX_* (0: none), filled by the loader per version */
BPF_ARRAY(io_wait_ctx, u8, NIO_EVENTS);

/*
 * The wait event the blocking backend published: open its context.
 * my_wait_event_info points at a local variable until InitProcess() points it
 * at the backend's PGPROC, where it stays: it is read once the backend has
 * answered a request (seq > 0) and kept, so later sleeps cost one user read.
 * Inside a context a probe opened (a heavyweight lock wait, a buffer write),
 * only an LWLock wait is opened, as the innermost context: waking from a lock
 * wait, a backend may wait for the lock manager's partition LWLock, and that
 * time is lwlock:LockManager, as the probes would time it.
 */
static __always_inline void enter_wait_event(struct task_state *st, int lwlock_only)
{
	u64 ptr = st->wait_event_ptr;
	u32 wei = 0, id;
	u8 *kind;

	if (!ptr) {
		if (bpf_probe_read_user(&ptr, sizeof(ptr), (void *)MY_WAIT_EVENT_INFO_ADDR) != 0 ||
		    !ptr)
			return;
		if (st->acc.seq > 0)
			st->wait_event_ptr = ptr;
	}
	if (bpf_probe_read_user(&wei, sizeof(wei), (void *)ptr) != 0)
		return;
	id = wei & PG_WAIT_ID_MASK;
	if (lwlock_only && (wei & PG_WAIT_CLASS_MASK) != PG_WAIT_LWLOCK)
		return;
	switch (wei & PG_WAIT_CLASS_MASK) {
	case PG_WAIT_LWLOCK:
		st->acc.n_lwlock++;
		push_ctx(st, CTX_LWLOCK, TRANCHE_ID_FLAG | id, 0, ORIGIN_SCHED);
		break;
	case PG_WAIT_LOCK:
		st->acc.n_lock++;
		push_ctx(st, CTX_LOCK, 0, id & 0xff, ORIGIN_SCHED);
		break;
	case PG_WAIT_IO:
		kind = io_wait_ctx.lookup(&id);
		if (!kind || !*kind)
			break;
		if (*kind == CTX_IO_READ)  /* e.g. a read an I/O worker does (18's AIO) */
			st->acc.n_read++;
		push_ctx(st, *kind, 0, 0, ORIGIN_SCHED);
		break;
	}
}
#endif

static __always_inline void on_switch(void *ctx, u32 prev, u32 next, int runnable)
{
	u64 now = 0;              /* read once a traced task is involved */
	struct task_state *st;

	st = state_of(prev);
	if (st) {
		now = bpf_ktime_get_ns();
		charge(st, now);
		if (runnable) {
			st->mode = MODE_RUNQ;
			st->wake_ts = now;
			st->acc.n_ivcsw++;
		} else {
			st->mode = MODE_BLOCKED;
			st->wake_runq_ns = 0;
			st->acc.n_vcsw++;
#ifdef MY_WAIT_EVENT_INFO_ADDR
			if (top_is(st, ORIGIN_SCHED))  /* its switch-in was not seen */
				st->depth--;
			if (st->req == REQ_BUSY && st->depth == 0)
				enter_wait_event(st, 0);
			else if (st->req == REQ_BUSY && top_is(st, ORIGIN_PROBE))
				enter_wait_event(st, 1);
#endif
#ifdef WITH_STACKS
			st->off_ustack = st->off_kstack = -1;
			if (st->req != REQ_NONE) {
				st->off_ustack = stack_traces.get_stackid(ctx, BPF_F_USER_STACK);
				st->off_kstack = stack_traces.get_stackid(ctx, 0);
			}
#endif
		}
	}
	st = state_of(next);
	if (st) {
		if (!now)
			now = bpf_ktime_get_ns();
		charge(st, now);
		if (top_is(st, ORIGIN_SCHED))
			st->depth--;
		if (st->mode == MODE_RUNQ && st->wake_ts && now > st->wake_ts) {
			st->wake_runq_ns = now - st->wake_ts;
			if (st->is_client) {
				struct runq_event ev = {.start = st->wake_ts, .end = now, .pid = next};
				if (client_runq.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP) != 0)
					bump(C_CLIENT_LOST);
			}
		}
		st->mode = MODE_ONCPU;
	}
}

static __always_inline void woken(u32 pid)
{
	struct task_state *st = state_of(pid);
	u64 now;
	if (!st || st->mode != MODE_BLOCKED)
		return;
	now = bpf_ktime_get_ns();
	charge(st, now);
	st->mode = MODE_RUNQ;
	st->wake_ts = now;
}

RAW_TRACEPOINT_PROBE(sched_switch)
{
	/* (bool preempt, struct task_struct *prev, struct task_struct *next, unsigned prev_state) */
	u32 prev = bpf_get_current_pid_tgid();  /* prev is the current task */
	on_switch(ctx, prev, pid_of_task((void *)ctx->args[2]),
		  ctx->args[0] || (ctx->args[3] & TASK_REPORT_BITS) == 0);
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_wakeup)
{
	woken(pid_of_task((void *)ctx->args[0]));
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_wakeup_new)
{
	woken(pid_of_task((void *)ctx->args[0]));
	return 0;
}

