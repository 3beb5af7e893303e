/*
 * sched.bpf.c: on CPU, waiting for a CPU (runqueue), or blocked.
 *
 * sched_switch charges the time before it and sets the mode from prev_state:
 * a task switched out while runnable (preempted, prev_state 0 or the
 * TASK_REPORT_MAX "R+" bit) waits in the run queue; any other state blocks.
 * sched_wakeup ends a block; the next switch-in ends the run-queue wait.
 * Driver threads (is_client) report each run-queue wait as an interval.
 */
#include "pgtrace.h"

#define TASK_REPORT_BITS 0x7f

TRACEPOINT_PROBE(sched, sched_switch)
{
	u64 now = bpf_ktime_get_ns();
	u32 prev = args->prev_pid, next = args->next_pid;
	struct task_state *st;

	st = tasks.lookup(&prev);
	if (st) {
		charge(st, now);
		if ((args->prev_state & TASK_REPORT_BITS) == 0) {
			st->mode = MODE_RUNQ;
			st->wake_ts = now;
			st->acc.n_ivcsw++;
		} else {
			st->mode = MODE_BLOCKED;
			st->wake_runq_ns = 0;
			st->acc.n_vcsw++;
#ifdef WITH_STACKS
			st->off_ustack = st->off_kstack = -1;
			if (st->req != REQ_NONE) {
				st->off_ustack = stack_traces.get_stackid(args, BPF_F_USER_STACK);
				st->off_kstack = stack_traces.get_stackid(args, 0);
			}
#endif
		}
	}
	st = tasks.lookup(&next);
	if (st) {
		charge(st, now);
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
	return TP_KEEP;
}

static __always_inline void woken(u32 pid)
{
	struct task_state *st = tasks.lookup(&pid);
	u64 now;
	if (!st || st->mode != MODE_BLOCKED)
		return;
	now = bpf_ktime_get_ns();
	charge(st, now);
	st->mode = MODE_RUNQ;
	st->wake_ts = now;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
	woken(args->pid);
	return TP_KEEP;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
	woken(args->pid);
	return TP_KEEP;
}
