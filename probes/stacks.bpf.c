/*
 * stacks.bpf.c: on-CPU stack samples of traced backends inside requests (a
 * perf event at a fixed frequency).  Off-CPU stacks are taken where a backend
 * blocks (sched.bpf.c) and charged with the blocked time, by bucket
 * (pgtrace.h, charge()).  Compiled only with -DWITH_STACKS.
 */
#include "pgtrace.h"

#ifdef WITH_STACKS
#include <uapi/linux/bpf_perf_event.h>

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
	struct task_state *st = current_state();
	struct stack_key key = {};
	if (!st || st->req != REQ_BUSY || st->is_client)
		return 0;
	key.ustack = stack_traces.get_stackid(&ctx->regs, BPF_F_USER_STACK);
	key.kstack = stack_traces.get_stackid(&ctx->regs, 0);
	oncpu_samples.increment(key);
	return 0;
}
#endif
