/*
 * syscalls.bpf.c: the system calls the engine follows, from the two raw
 * syscall tracepoints.
 *
 * One raw program per direction sees every system call of every task and
 * dispatches on the call's number (NR_* flags for this architecture, from the
 * loader).  That costs a switch for the calls pgtrace ignores, where the
 * per-call syscalls:* perf tracepoints would build and submit a perf record
 * for each call they follow.
 *
 * Exits: a wait context a syscall opened is closed by that syscall's exit,
 * the next exit of its task (system calls do not nest).  The call's number is
 * read from the saved registers only where an exit matters by number: a
 * a traced backend's receive, the end of a ReadyForQuery send, a WAL open.
 */
#include "pgtrace.h"

static __always_inline u64 sys_arg(u64 *field)
{
	u64 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), field);
	return v;
}

RAW_TRACEPOINT_PROBE(sys_enter)
{
	/* (struct pt_regs *regs, long id) */
	struct pt_regs *regs = (struct pt_regs *)ctx->args[0];

	switch (ctx->args[1]) {
	case NR_SENDTO:
		sendto_enter((const u8 *)sys_arg((u64 *)&PT_REGS_PARM2(regs)),
			     sys_arg((u64 *)&PT_REGS_PARM3(regs)));
		break;
	case NR_RECVFROM:
		recvfrom_enter(sys_arg((u64 *)&PT_REGS_PARM1(regs)));
		break;
	case NR_EXIT_GROUP:
		exit_group_enter(sys_arg((u64 *)&PT_REGS_PARM1(regs)));
		break;
	case NR_OPENAT:
		openat_enter((const char *)sys_arg((u64 *)&PT_REGS_PARM2(regs)));
		break;
	case NR_CLOSE:
		close_enter(sys_arg((u64 *)&PT_REGS_PARM1(regs)));
		break;
	case NR_FDATASYNC:
		sync_enter(sys_arg((u64 *)&PT_REGS_PARM1(regs)), 0);
		break;
	case NR_FSYNC:
		sync_enter(sys_arg((u64 *)&PT_REGS_PARM1(regs)), 1);
		break;
	case NR_PWRITE64:
	case NR_PWRITEV:
	case NR_FALLOCATE:
		write_enter(sys_arg((u64 *)&PT_REGS_PARM1(regs)));
		break;
	}
	return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
	/* (struct pt_regs *regs, long ret) */
	struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
	long ret = ctx->args[1];
	struct task_state *st = current_state();
	u64 nr;

	if (!st)
		return 0;
	if (top_is(st, ORIGIN_SYSCALL)) {
		charge(st, bpf_ktime_get_ns());
		st->depth--;
		return 0;
	}
	if (st->recv_fd < 0 && !st->resending && !st->opening_wal)
		return 0;
	nr = sys_arg((u64 *)&regs->SYSCALL_NR_FIELD);
	if (nr == NR_RECVFROM && st->recv_fd >= 0) {
		recvfrom_exit(st, ret);
		st->recv_fd = -1;
	} else if (nr == NR_SENDTO && st->resending)
		sendto_exit(st, ret);
	else if (nr == NR_OPENAT && st->opening_wal)
		openat_exit(st, ret);
	return 0;
}
